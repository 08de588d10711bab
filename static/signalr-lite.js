// signalr-lite.js: a small, readable SignalR client for browsers (ES module, no dependencies).
//
// It speaks the ASP.NET Core SignalR wire protocol as specified in dotnet/aspnetcore
// (docs/specs/TransportProtocols.md and docs/specs/HubProtocol.md):
//
//   1. negotiate  POST {hub}/negotiate?negotiateVersion=1 → a connection token and the
//                 transports the server offers (redirects via {url, accessToken} are followed)
//   2. transport  WebSockets, Server-Sent Events or Long Polling, in the server's order; when
//                 one fails to start, negotiate again (a fresh connection) and try the next
//   3. handshake  {"protocol":"json","version":1}␞  →  {}␞  (or {"error": "..."}␞)
//   4. messages   JSON records, each terminated by the 0x1E record separator (␞)
//
// plus keep-alive pings, a server timeout and automatic reconnect (forever by default, with
// a capped, jittered backoff; reconnectNow() skips the wait, e.g. on `online`).
//
//   const hub = new HubConnection("/chat", { transport: "LongPolling" });
//   hub.on("ReceiveMessage", (msg) => console.log(msg.text));
//   hub.addEventListener("statechange", (e) => console.log(e.detail.state));
//   await hub.start();
//   const me = await hub.invoke("WhoAmI");

const RS = "\x1e"; // the record separator that ends every JSON hub message

export const MessageType = Object.freeze({
  Invocation: 1, StreamItem: 2, Completion: 3, StreamInvocation: 4, CancelInvocation: 5, Ping: 6, Close: 7,
});

const ALIASES = {
  ws: "WebSockets", websocket: "WebSockets", websockets: "WebSockets",
  sse: "ServerSentEvents", serversentevents: "ServerSentEvents", eventsource: "ServerSentEvents",
  lp: "LongPolling", longpolling: "LongPolling", polling: "LongPolling",
};

/** "ws", "SSE", "long-polling", "WebSockets"… → the canonical name, or null if unknown. */
export function normalizeTransport(name) {
  return name ? ALIASES[String(name).toLowerCase().replace(/[^a-z]/g, "")] || null : null;
}

const DEFAULTS = {
  transport: null,               // force one transport (any spelling normalizeTransport knows)
  accessTokenFactory: null,      // () => string | Promise<string>: Bearer header / access_token
  // ms before each reconnect attempt: an array (then give up after its last entry; [] =
  // never reconnect) or a function (attempt) => ms, or null to give up.
  reconnectDelays: backoff,
  keepAliveIntervalMs: 15000,    // send a Ping when nothing was sent for this long
  serverTimeoutMs: 30000,        // drop the connection when nothing was received for this long
  handshakeTimeoutMs: 15000,
  pollTimeoutMs: 100000,         // client-side limit for one long poll
};
/** The default reconnect delay: 0, 1, 2, 4, 8 s, then 10 s forever, each ±20 % so that a
 * crowd of pages does not come back in lockstep after an outage. */
export function backoff(attempt) {
  const base = attempt === 0 ? 0 : Math.min(10000, 1000 * 2 ** (attempt - 1));
  return Math.round(base * (0.8 + Math.random() * 0.4));
}

const REQUEST_TIMEOUT_MS = 100000; // other HTTP requests (negotiate, POST, DELETE), as the official client
const MAX_REDIRECTS = 100;

// ---- HTTP helpers ---------------------------------------------------------------------

export class HttpError extends Error {
  constructor(message, status) { super(message); this.name = "HttpError"; this.status = status; }
}

function request(method, url, { body, headers = {}, accessToken, signal, keepalive } = {}) {
  const all = { "X-Requested-With": "XMLHttpRequest", ...headers };
  if (accessToken) all.Authorization = `Bearer ${accessToken}`;
  signal ||= AbortSignal.timeout?.(REQUEST_TIMEOUT_MS);
  return fetch(url, { method, body, signal, keepalive, headers: all, credentials: "include", cache: "no-store" });
}

/** Appends `name=value` to a URL; the value goes in verbatim (connection tokens are URL-safe). */
function addQuery(url, name, value) {
  return `${url}${url.includes("?") ? "&" : "?"}${name}=${value}`;
}

/** Sends for SSE and Long Polling: one POST at a time, so the server sees records in order;
 *  whatever is queued meanwhile goes out together in the next POST. */
class PostSender {
  constructor(url, accessToken) {
    Object.assign(this, { url, accessToken, buffer: "", waiters: [], busy: false });
  }

  send(text) {
    return new Promise((resolve, reject) => {
      this.buffer += text;
      this.waiters.push({ resolve, reject });
      if (!this.busy) this.flush();
    });
  }

  async flush() {
    this.busy = true;
    while (this.buffer) {
      const body = this.buffer, waiters = this.waiters;
      this.buffer = ""; this.waiters = [];
      try {
        const res = await request("POST", this.url, {
          body, accessToken: this.accessToken, headers: { "Content-Type": "text/plain;charset=UTF-8" },
          keepalive: body.length < 32768, // lets a last message (e.g. Close) out while the page unloads
        });
        if (!res.ok) throw new HttpError(`Sending failed: the server answered ${res.status}`, res.status);
        waiters.forEach((w) => w.resolve());
      } catch (error) {
        waiters.forEach((w) => w.reject(error));
      }
    }
    this.busy = false;
  }
}

// ---- Transports -------------------------------------------------------------------------
// All three have the same shape:
//   connect()   resolves once the transport is usable, rejects if it cannot start
//   send(text)  resolves once the text is handed over
//   stop()      ends it (no onclose follows)
//   onreceive(text), onclose(error | null): set by the HubConnection

class WebSocketTransport {
  constructor(url, accessToken) {
    this.name = "WebSockets";
    this.url = url.replace(/^http/, "ws");
    if (accessToken) this.url = addQuery(this.url, "access_token", encodeURIComponent(accessToken));
  }

  connect() {
    return new Promise((resolve, reject) => {
      const ws = (this.ws = new WebSocket(this.url));
      let opened = false;
      ws.onopen = () => { opened = true; resolve(); };
      ws.onmessage = (event) => this.onreceive(event.data); // text frames arrive as strings
      ws.onclose = (event) => { // (onerror has no details and is always followed by onclose)
        this.ws = null;
        if (!opened) return reject(new Error(`WebSocket failed to connect (code ${event.code})`));
        if (this.stopped) return;
        this.onclose(event.wasClean && event.code === 1000 ? null
          : new Error(`WebSocket closed with code ${event.code}${event.reason ? ` (${event.reason})` : ""}`));
      };
    });
  }

  async send(text) {
    if (this.ws?.readyState !== WebSocket.OPEN) throw new Error("The WebSocket is not open");
    this.ws.send(text);
  }

  async stop() { this.stopped = true; this.ws?.close(1000); this.ws = null; }
}

class ServerSentEventsTransport {
  constructor(url, accessToken) {
    this.name = "ServerSentEvents";
    this.url = accessToken ? addQuery(url, "access_token", encodeURIComponent(accessToken)) : url;
    this.sender = new PostSender(url, accessToken);
  }

  connect() {
    return new Promise((resolve, reject) => {
      const es = (this.es = new EventSource(this.url, { withCredentials: true }));
      let opened = false;
      es.onopen = () => { opened = true; resolve(); };
      es.onmessage = (event) => this.onreceive(event.data);
      es.onerror = () => {
        // EventSource would quietly reconnect with the same id; SignalR forbids that, so any
        // error ends this transport (the HubConnection decides whether to reconnect).
        es.close(); this.es = null;
        if (!opened) reject(new Error("EventSource failed to connect"));
        else if (!this.stopped) this.onclose(new Error("The event stream ended"));
      };
    });
  }

  send(text) { return this.sender.send(text); }

  async stop() { this.stopped = true; this.es?.close(); this.es = null; }
}

class LongPollingTransport {
  constructor(url, accessToken, pollTimeoutMs) {
    Object.assign(this, { name: "LongPolling", url, accessToken, pollTimeoutMs });
    this.sender = new PostSender(url, accessToken);
  }

  async connect() {
    // The server answers the first poll at once (empty 200): then the connection is usable.
    const first = await this.poll();
    if (first.status === 204) throw new Error("The server ended the connection at once (204)");
    if (first.status !== 200) throw new HttpError(`The first poll was answered ${first.status}`, first.status);
    this.loop(); // from now on, keep one poll outstanding
  }

  /** One GET; resolves to {status, text}, or {timedOut: true} after pollTimeoutMs. */
  async poll() {
    const abort = new AbortController();
    let timedOut = false;
    this.abortPoll = () => abort.abort();
    const timer = setTimeout(() => { timedOut = true; abort.abort(); }, this.pollTimeoutMs);
    try {
      const res = await request("GET", addQuery(this.url, "_", Date.now()),
        { accessToken: this.accessToken, signal: abort.signal });
      return { status: res.status, text: await res.text() };
    } catch (error) {
      if (timedOut) return { timedOut: true };
      throw error;
    } finally {
      clearTimeout(timer);
    }
  }

  async loop() {
    while (!this.stopped) {
      let result;
      try { result = await this.poll(); } catch (error) { return this.finish(error); }
      if (this.stopped) return;
      if (result.timedOut) continue;                     // nothing came: poll again
      if (result.status === 204) return this.finish(null); // 204: the connection is over
      if (result.status !== 200) {
        return this.finish(new HttpError(`A poll was answered ${result.status}`, result.status));
      }
      if (result.text) this.onreceive(result.text);      // an empty 200 only means "poll again"
    }
  }

  finish(error) {
    if (this.stopped) return;
    this.stopped = true;
    this.onclose(error);
  }

  send(text) { return this.sender.send(text); }

  async stop() {
    if (this.stopped) return; // the server already ended it: nothing to DELETE
    this.stopped = true;
    this.abortPoll?.();
    await request("DELETE", this.url, { accessToken: this.accessToken, keepalive: true })
      .catch(() => {}); // best effort: the server times the connection out anyway
  }
}

const TRANSPORT_CLASSES = {
  WebSockets: WebSocketTransport, ServerSentEvents: ServerSentEventsTransport, LongPolling: LongPollingTransport,
};

const browserSupports = (name) => ({
  WebSockets: typeof WebSocket === "function", ServerSentEvents: typeof EventSource === "function", LongPolling: true,
})[name] === true;

// ---- HubConnection ------------------------------------------------------------------------

/**
 * A connection to one hub. Events (CustomEvents; read `event.detail`):
 *   statechange   {state, previous}   "disconnected" | "connecting" | "connected" | "reconnecting"
 *   connected     {connectionId, transport, reconnected}   after start() and after each reconnect
 *   reconnecting  {error}             the connection was lost; reconnect attempts follow
 *   retrying      {attempt, delay, error}   a reconnect attempt is due in `delay` ms
 *   disconnected  {error}             stopped (error null), failed to start, or gave up
 *   log           {level, category, message, time}   level "info" | "warn" | "error"
 */
export class HubConnection extends EventTarget {
  constructor(url, options = {}) {
    super();
    this.baseUrl = new URL(url, globalThis.location?.href).href;
    this.options = { ...DEFAULTS, ...options, transport: normalizeTransport(options.transport) };
    if (options.transport && !this.options.transport) throw new Error(`Unknown transport '${options.transport}'`);
    this.state = "disconnected";
    this.connectionId = null;   // the current connection's id (a new one after every reconnect)
    this.transportName = null;  // the transport in use
    this.handlers = new Map();  // lower-case target → [handler]
    this.callbacks = new Map(); // invocationId → {item(value), done(error, result)}
    this.nextInvocationId = 0;
    this.transport = null;      // the live transport; callbacks from any other one are ignored
    this.buffer = "";           // the start of a record whose end has not arrived yet
    this.stopRequested = false;
  }

  // ---- public API ----

  /** Registers a handler for a server → client target (matched case-insensitively). */
  on(target, handler) {
    const key = target.toLowerCase();
    this.handlers.set(key, [...(this.handlers.get(key) || []), handler]);
  }

  /** Removes one handler, or all of the target's handlers when none is given. */
  off(target, handler) {
    const key = target.toLowerCase();
    this.handlers.set(key, handler ? (this.handlers.get(key) || []).filter((h) => h !== handler) : []);
  }

  async start() {
    if (this.state !== "disconnected") throw new Error(`Cannot start a connection that is ${this.state}`);
    this.stopRequested = false;
    this.setState("connecting");
    try {
      await this.connect();
    } catch (error) {
      if (!this.stopRequested) {
        this.log("error", "connect", `Could not connect: ${error.message}`);
        this.setState("disconnected");
        this.emit("disconnected", { error });
      }
      throw error;
    }
    this.connectedNow(false);
  }

  async stop() {
    this.stopRequested = true;
    this.wakeUp?.(); // cut a reconnect delay short
    if (this.state === "disconnected") return;
    // No await before the requests go out, so that this also works while the page unloads.
    const transport = this.transport;
    const closing = transport && this.state === "connected"
      ? this.sendMessage({ type: MessageType.Close }).catch(() => {}) : null;
    this.teardown(new Error("The connection was stopped"));
    const stopping = transport?.stop().catch(() => {});
    this.log("info", "connect", "Connection stopped");
    this.setState("disconnected");
    this.emit("disconnected", { error: null });
    await Promise.all([closing, stopping]);
  }

  /** Calls a hub method; resolves with its result or rejects with the server's error. */
  invoke(target, ...args) {
    const invocationId = String(this.nextInvocationId++);
    return new Promise((resolve, reject) => {
      this.callbacks.set(invocationId, { item() {}, done: (error, value) => (error ? reject(error) : resolve(value)) });
      this.sendMessage({ type: MessageType.Invocation, invocationId, target, arguments: args })
        .catch((error) => { this.callbacks.delete(invocationId); reject(error); });
    });
  }

  /** Calls a hub method without asking for a result. Resolves once sent. */
  send(target, ...args) {
    return this.sendMessage({ type: MessageType.Invocation, target, arguments: args });
  }

  /** Calls a streaming hub method: stream(…).subscribe({next, error, complete}) → {dispose()}. */
  stream(target, ...args) {
    return { subscribe: (observer) => {
      const invocationId = String(this.nextInvocationId++);
      let closed = false;
      const finish = (report) => {
        if (closed) return;
        closed = true;
        this.callbacks.delete(invocationId);
        report();
      };
      this.callbacks.set(invocationId, {
        item: (value) => { if (!closed) observer.next?.(value); },
        done: (error) => finish(() => (error ? observer.error?.(error) : observer.complete?.())),
      });
      this.sendMessage({ type: MessageType.StreamInvocation, invocationId, target, arguments: args })
        .catch((error) => finish(() => observer.error?.(error)));
      return { dispose: () => {
        if (closed) return;
        finish(() => {});
        this.sendMessage({ type: MessageType.CancelInvocation, invocationId }).catch(() => {});
      } };
    } };
  }

  // ---- connecting ----

  /** negotiate, then the transports in the server's order with fallback, then the handshake. */
  async connect() {
    const forced = this.options.transport;
    let negotiation = await this.negotiate();
    const offered = negotiation.availableTransports || [];
    if (forced) {
      this.log("info", "transport", `Transport forced to ${forced}`);
      if (!offered.some((t) => t.transport === forced)) throw new Error(`The server does not offer ${forced}`);
    }
    const candidates = offered.filter((t) => !forced || t.transport === forced).filter((t) => {
      const usable = browserSupports(t.transport) && (t.transferFormats || []).includes("Text");
      if (!usable) this.log("info", "transport", `Skipping ${t.transport}: not usable here`);
      return usable;
    }).map((t) => t.transport);
    const failures = [];
    for (const [index, name] of candidates.entries()) {
      try {
        // A transport that failed to start spoils its connection: negotiate a fresh one.
        negotiation ||= await this.negotiate();
        await this.startTransport(name, negotiation);
        return;
      } catch (error) {
        if (this.stopRequested) throw error;
        failures.push(`${name}: ${error.message}`);
        const next = candidates[index + 1];
        this.log("warn", "fallback", `${name} failed to start (${error.message})${next ? `; falling back to ${next}` : ""}`);
        negotiation = null;
      }
    }
    throw new Error(failures.length ? `No transport could start (${failures.join("; ")})` : "No usable transport");
  }

  async negotiate() {
    let url = this.baseUrl;
    let accessToken = this.options.accessTokenFactory ? await this.options.accessTokenFactory() : null;
    for (let redirects = 0; redirects < MAX_REDIRECTS; redirects++) {
      const negotiateUrl = new URL(url);
      negotiateUrl.pathname = negotiateUrl.pathname.replace(/\/?$/, "/negotiate");
      negotiateUrl.searchParams.set("negotiateVersion", "1");
      this.log("info", "negotiate", `POST ${negotiateUrl.pathname}`);
      const res = await request("POST", negotiateUrl.href, { accessToken })
        .catch((error) => { throw new Error(`Negotiate failed: ${error.message}`); });
      this.checkStopped();
      if (res.status !== 200) throw new HttpError(`Negotiate failed: the server answered ${res.status}`, res.status);
      const body = await res.json();
      if (body.error) throw new Error(`Negotiate refused: ${body.error}`);
      if (body.url) { // a redirect (e.g. to a SignalR service), maybe with a token to use there
        this.log("info", "negotiate", `Redirected to ${body.url}`);
        url = body.url;
        accessToken = body.accessToken || accessToken;
        continue;
      }
      if (!body.negotiateVersion) body.connectionToken = body.connectionId; // version 0 has no token
      const instance = res.headers.get("X-Stickless-Instance");
      this.log("info", "negotiate", `Got connection ${body.connectionId}${instance ? ` from instance ${instance}` : ""}` +
        `; offered: ${(body.availableTransports || []).map((t) => t.transport).join(", ") || "nothing"}`);
      return { ...body, url, accessToken };
    }
    throw new Error("Negotiate redirection limit exceeded");
  }

  async startTransport(name, negotiation) {
    const url = addQuery(negotiation.url, "id", negotiation.connectionToken);
    const transport = new TRANSPORT_CLASSES[name](url, negotiation.accessToken, this.options.pollTimeoutMs);
    transport.onreceive = (text) => this.receive(transport, text);
    transport.onclose = (error) => this.transportClosed(transport, error);
    this.log("info", "transport", `Starting ${name}`);
    this.transport = transport;
    this.buffer = "";
    try {
      await transport.connect();
      this.checkStopped();
      await this.handshake(transport);
      this.checkStopped();
    } catch (error) {
      if (this.transport === transport) this.transport = null;
      transport.stop().catch(() => {});
      throw error;
    }
    this.connectionId = negotiation.connectionId;
    this.transportName = name;
    // Long polling keeps itself alive (a poll is always outstanding): no pings, no timeout.
    this.timersActive = name !== "LongPolling";
    this.resetKeepAlive();
    this.resetServerTimeout();
  }

  handshake(transport) {
    let timer;
    const reply = new Promise((resolve, reject) => {
      this.pendingHandshake = { resolve, reject };
      timer = setTimeout(() => reject(new Error("No handshake response")), this.options.handshakeTimeoutMs);
    });
    const sent = transport.send(JSON.stringify({ protocol: "json", version: 1 }) + RS);
    return Promise.all([sent, reply]).finally(() => { clearTimeout(timer); this.pendingHandshake = null; });
  }

  checkStopped() { if (this.stopRequested) throw new Error("The connection was stopped while connecting"); }

  connectedNow(reconnected) {
    this.setState("connected");
    this.log("info", "connect", `${reconnected ? "Reconnected" : "Connected"} over ${this.transportName} as ${this.connectionId}`);
    this.emit("connected", { connectionId: this.connectionId, transport: this.transportName, reconnected });
  }

  // ---- receiving ----

  receive(transport, text) {
    if (transport !== this.transport) return; // a transport we no longer use
    this.resetServerTimeout();
    this.buffer += text;
    let end;
    while ((end = this.buffer.indexOf(RS)) !== -1) {
      const record = this.buffer.slice(0, end);
      this.buffer = this.buffer.slice(end + 1);
      let message;
      try {
        message = JSON.parse(record);
      } catch {
        const error = new Error("The server sent a record that is not JSON");
        return this.pendingHandshake ? this.pendingHandshake.reject(error) : this.connectionLost(error, false);
      }
      if (this.pendingHandshake) { // the first record answers the handshake
        if (message.error) this.pendingHandshake.reject(new Error(`Handshake refused: ${message.error}`));
        else this.pendingHandshake.resolve();
        this.pendingHandshake = null;
        continue;
      }
      this.dispatch(message);
      if (transport !== this.transport) return; // that message ended the connection
    }
  }

  /** Answers a client-result call with the first handler's value or error, as the
   * official client does; without a handler, with its error text. */
  async answer(invocationId, handler, args) {
    let reply;
    if (!handler) reply = { type: MessageType.Completion, invocationId, error: "Client didn't provide a result." };
    else {
      try { reply = { type: MessageType.Completion, invocationId, result: await handler.apply(this, args) }; }
      catch (error) { reply = { type: MessageType.Completion, invocationId, error: String(error?.message ?? error) }; }
    }
    this.sendMessage(reply).catch(() => {});
  }

  dispatch(message) {
    switch (message.type) {
      case MessageType.Invocation: {
        const handlers = this.handlers.get(String(message.target).toLowerCase()) || [];
        if (!handlers.length) this.log("warn", "message", `No handler for '${message.target}'`);
        if (message.invocationId) { // the server wants a result (client results)
          this.answer(message.invocationId, handlers[0], message.arguments || []);
          break;
        }
        for (const handler of handlers) {
          try { handler.apply(this, message.arguments || []); } catch (error) {
            this.log("error", "message", `Handler for '${message.target}' threw: ${error.message}`);
          }
        }
        break;
      }
      case MessageType.StreamItem: this.callbacks.get(message.invocationId)?.item(message.item); break;
      case MessageType.Completion: {
        const callback = this.callbacks.get(message.invocationId);
        this.callbacks.delete(message.invocationId);
        callback?.done(message.error ? new Error(message.error) : null, message.result);
        break;
      }
      case MessageType.Ping: break; // it has already reset the server timeout
      case MessageType.Close: {
        const error = message.error ? new Error(`The server closed the connection: ${message.error}`) : null;
        this.log(error ? "warn" : "info", "close", `Close message from the server` +
          `${error ? ` (${message.error})` : ""}${message.allowReconnect ? ", reconnect allowed" : ""}`);
        this.connectionLost(error, message.allowReconnect === true);
        break;
      }
      default:
        this.log("warn", "message", `Ignoring a message of unknown type ${message.type}`);
    }
  }

  // ---- sending, keep-alive, server timeout ----

  sendMessage(message) {
    if (this.state !== "connected" || !this.transport) {
      return Promise.reject(new Error(`Cannot send while the connection is ${this.state}`));
    }
    this.resetKeepAlive();
    return this.transport.send(JSON.stringify(message) + RS);
  }

  resetKeepAlive() {
    clearTimeout(this.pingTimer);
    if (!this.timersActive) return;
    this.pingTimer = setTimeout(() => this.sendMessage({ type: MessageType.Ping }).catch(() => {}),
      this.options.keepAliveIntervalMs);
  }

  resetServerTimeout() {
    clearTimeout(this.timeoutTimer);
    if (!this.timersActive) return;
    this.timeoutTimer = setTimeout(() => this.connectionLost(
      new Error(`Nothing received from the server for ${this.options.serverTimeoutMs / 1000} s`)),
    this.options.serverTimeoutMs);
  }

  // ---- losing the connection, reconnecting ----

  transportClosed(transport, error) {
    if (transport !== this.transport) return;
    if (this.pendingHandshake) return this.pendingHandshake.reject(error || new Error("Closed during the handshake"));
    this.connectionLost(error || new Error(`The ${transport.name} transport closed`));
  }

  /** Forgets the current transport: timers off, a pending handshake and outstanding calls rejected. */
  teardown(reason) {
    this.timersActive = false;
    clearTimeout(this.pingTimer);
    clearTimeout(this.timeoutTimer);
    this.transport = null;
    this.pendingHandshake?.reject(reason || new Error("The connection closed"));
    this.pendingHandshake = null;
    const callbacks = [...this.callbacks.values()];
    this.callbacks.clear();
    for (const callback of callbacks) {
      callback.done(new Error(`Invocation canceled: ${reason ? reason.message : "the connection closed"}`));
    }
  }

  connectionLost(error, allowReconnect = true) {
    if (this.state !== "connected") return;
    const transport = this.transport;
    this.teardown(error);
    transport?.stop().catch(() => {});
    if (allowReconnect && !this.stopRequested && this.delayBefore(0) !== null) return this.reconnect(error);
    this.log(error ? "error" : "info", "close", `Disconnected${error ? `: ${error.message}` : ""}`);
    this.setState("disconnected");
    this.emit("disconnected", { error });
  }

  /** The wait before reconnect attempt `attempt` (0-based), or null to give up. */
  delayBefore(attempt) {
    const delays = this.options.reconnectDelays;
    if (typeof delays === "function") return delays(attempt) ?? null;
    return Array.isArray(delays) && attempt < delays.length ? delays[attempt] : null;
  }

  /** Skips the wait before the next reconnect attempt (e.g. the browser came back online). */
  reconnectNow() {
    this.wakeUp?.();
  }

  async reconnect(error) {
    this.log("warn", "reconnect", `Connection lost${error ? ` (${error.message})` : ""}`);
    this.setState("reconnecting");
    this.emit("reconnecting", { error });
    let lastError = error;
    for (let attempt = 0; ; attempt++) {
      const delay = this.delayBefore(attempt);
      if (delay === null) break;
      this.log("info", "reconnect", `Attempt ${attempt + 1} ${delay ? `in ${(delay / 1000).toFixed(1)} s` : "now"}`);
      this.emit("retrying", { attempt: attempt + 1, delay, error: lastError });
      await new Promise((resolve) => {
        const timer = setTimeout(resolve, delay);
        this.wakeUp = () => { clearTimeout(timer); resolve(); };
      });
      this.wakeUp = null;
      if (this.stopRequested) return; // stop() has reported "disconnected" already
      try {
        await this.connect(); // a full new negotiate: a new connection, perhaps on another instance
      } catch (failure) {
        if (this.stopRequested) return;
        lastError = failure;
        this.log("warn", "reconnect", `Attempt ${attempt + 1} failed: ${failure.message}`);
        continue;
      }
      return this.connectedNow(true);
    }
    const gaveUp = new Error("Gave up reconnecting");
    this.log("error", "reconnect", gaveUp.message);
    this.setState("disconnected");
    this.emit("disconnected", { error: gaveUp });
  }

  // ---- events ----

  setState(state) {
    if (state === this.state) return;
    const previous = this.state;
    this.state = state;
    if (state !== "connected") { this.connectionId = null; this.transportName = null; }
    this.emit("statechange", { state, previous });
  }

  emit(type, detail) { this.dispatchEvent(new CustomEvent(type, { detail })); }

  log(level, category, message) { this.emit("log", { level, category, message, time: new Date() }); }
}
