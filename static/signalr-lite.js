// signalr-lite: a small, readable SignalR client (JSON hub protocol) for the chat page.
// Negotiates, tries the server's transports in order (WebSockets, Server-Sent Events,
// Long Polling) with fallback, keeps the connection alive, and reconnects automatically.
// Spec: TransportProtocols.md and HubProtocol.md in dotnet/aspnetcore.

const RS = "\x1e";
const DELAYS = [0, 2000, 10000, 30000];

export class HubConnection {
  constructor(url, { transport = null, onEvent = () => {} } = {}) {
    this.url = url;
    this.forced = transport;          // "WebSockets" | "ServerSentEvents" | "LongPolling" | null
    this.onEvent = onEvent;           // (kind, detail) for the page's event log
    this.handlers = new Map();        // lower-case target -> [fn]
    this.pending = new Map();         // invocationId -> {resolve, reject}
    this.nextId = 0;
    this.state = "disconnected";
    this.transport = null;
    this.connectionId = null;
    this.stopped = false;
  }

  on(target, fn) {
    const key = target.toLowerCase();
    this.handlers.set(key, [...(this.handlers.get(key) || []), fn]);
  }

  setState(state) { this.state = state; this.onEvent("state", state); }

  async start() {
    this.stopped = false;
    this.setState("connecting");
    await this.connect();
  }

  async stop() {
    this.stopped = true;
    await this.closeTransport(true);
    this.setState("disconnected");
  }

  send(target, ...args) { this.write({ type: 1, target, arguments: args }); }

  invoke(target, ...args) {
    const invocationId = String(this.nextId++);
    return new Promise((resolve, reject) => {
      this.pending.set(invocationId, { resolve, reject });
      try { this.write({ type: 1, invocationId, target, arguments: args }); }
      catch (e) { this.pending.delete(invocationId); reject(e); }
    });
  }

  // --- connecting -------------------------------------------------------------------

  async connect() {
    let lastError = null;
    const order = ["WebSockets", "ServerSentEvents", "LongPolling"];
    for (const name of order) {
      if (this.forced && this.forced !== name) continue;
      try {
        // Every attempt negotiates a new connection (a failed transport spoils the old one).
        const nego = await this.negotiate();
        const offered = nego.availableTransports.map((t) => t.transport);
        if (!offered.includes(name)) continue;
        this.onEvent("log", `trying ${name}`);
        await this.openTransport(name, nego.connectionToken || nego.connectionId);
        this.connectionId = nego.connectionId;
        this.transport = name;
        await this.handshake();
        this.setState("connected");
        this.startKeepAlive();
        return;
      } catch (e) {
        lastError = e;
        this.onEvent("log", `${name} failed: ${e.message}`);
        await this.closeTransport(false);
      }
    }
    throw lastError || new Error("no transport available");
  }

  async negotiate() {
    const res = await fetch(`${this.url}/negotiate?negotiateVersion=1`, {
      method: "POST", headers: { "X-Requested-With": "XMLHttpRequest" },
    });
    if (!res.ok) throw new Error(`negotiate answered ${res.status}`);
    this.instance = res.headers.get("X-Stickless-Instance");
    const body = await res.json();
    if (body.error) throw new Error(body.error);
    this.onEvent("log", `negotiated ${body.connectionId} on ${this.instance || "?"}`);
    return body;
  }

  openTransport(name, token) {
    this.buffer = "";
    this.token = token;
    const url = `${this.url}?id=${token}`;
    if (name === "WebSockets") {
      return new Promise((resolve, reject) => {
        const ws = new WebSocket(url.replace(/^http/, "ws"));
        this.ws = ws;
        ws.onopen = () => resolve();
        ws.onerror = () => reject(new Error("WebSocket error"));
        ws.onmessage = (e) => this.receive(e.data);
        ws.onclose = (e) => this.lost(e.code === 1000 ? null : `WebSocket closed (${e.code})`);
      });
    }
    if (name === "ServerSentEvents") {
      return new Promise((resolve, reject) => {
        const es = new EventSource(url, { withCredentials: true });
        this.es = es;
        let open = false;
        es.onopen = () => { open = true; resolve(); };
        es.onmessage = (e) => this.receive(e.data);
        es.onerror = () => { if (!open) reject(new Error("EventSource error")); else this.lost("event stream ended"); };
      });
    }
    // Long polling: the first poll is answered at once; then keep one poll open.
    return this.poll(url, true).then(() => { this.polling = true; this.pollLoop(url); });
  }

  async poll(url, first = false) {
    this.pollAbort = new AbortController();
    const res = await fetch(`${url}&_=${Date.now()}`, {
      headers: { "X-Requested-With": "XMLHttpRequest" }, signal: this.pollAbort.signal,
    });
    if (res.status === 204) return null;
    if (!res.ok) throw new Error(`poll answered ${res.status}`);
    const text = await res.text();
    if (!first && text) this.receive(text);
    return text;
  }

  async pollLoop(url) {
    while (this.polling) {
      try {
        if ((await this.poll(url)) === null) { this.lost(null); return; }
      } catch (e) {
        if (this.polling) this.lost(e.message);
        return;
      }
    }
  }

  handshake() {
    return new Promise((resolve, reject) => {
      this.handshakeDone = { resolve, reject };
      this.rawWrite(JSON.stringify({ protocol: "json", version: 1 }) + RS);
      setTimeout(() => reject(new Error("handshake timed out")), 15000);
    });
  }

  async closeTransport(graceful) {
    clearInterval(this.keepAlive);
    this.polling = false;
    const { ws, es, token } = this;
    this.ws = this.es = null;
    if (graceful && this.state === "connected") { try { this.write({ type: 7 }); } catch {} }
    if (ws) { ws.onclose = null; ws.close(1000); }
    if (es) es.close();
    if (this.pollAbort) this.pollAbort.abort();
    if (this.transport === "LongPolling" && token && graceful) {
      await fetch(`${this.url}?id=${token}`, { method: "DELETE" }).catch(() => {});
    }
  }

  // --- sending and receiving ----------------------------------------------------------

  write(message) { this.rawWrite(JSON.stringify(message) + RS); }

  async answer(invocationId, handler, args) {
    let reply;
    if (!handler) reply = { type: 3, invocationId, error: "Client didn't provide a result." };
    else {
      try { reply = { type: 3, invocationId, result: await handler(...args) }; }
      catch (e) { reply = { type: 3, invocationId, error: String(e) }; }
    }
    try { this.write(reply); } catch {}
  }

  rawWrite(text) {
    if (this.ws) { this.ws.send(text); return; }
    if (!this.token) throw new Error("not connected");
    // One POST at a time, so that messages arrive in the order they were sent.
    const url = `${this.url}?id=${this.token}`;
    this.sendChain = (this.sendChain || Promise.resolve()).then(() => fetch(url, {
      method: "POST", body: text,
      headers: { "Content-Type": "text/plain;charset=UTF-8", "X-Requested-With": "XMLHttpRequest" },
    })).then((res) => { if (!res.ok) this.lost(`send answered ${res.status}`); })
      .catch((e) => this.lost(e.message));
  }

  receive(data) {
    this.lastReceived = Date.now();
    this.buffer += data;
    const records = this.buffer.split(RS);
    this.buffer = records.pop();   // an incomplete record waits for the rest
    for (const record of records) {
      const msg = JSON.parse(record);
      if (this.handshakeDone) {
        const done = this.handshakeDone;
        this.handshakeDone = null;
        if (msg.error) done.reject(new Error(msg.error)); else done.resolve();
        continue;
      }
      this.dispatch(msg);
    }
  }

  dispatch(msg) {
    switch (msg.type) {
      case 1: {
        const handlers = this.handlers.get(msg.target.toLowerCase()) || [];
        if (msg.invocationId === undefined) { handlers.forEach((fn) => fn(...msg.arguments)); break; }
        // A client-result call: the first handler's value (or error) is the answer, as the
        // official client does; without a handler, its error text.
        this.answer(msg.invocationId, handlers[0], msg.arguments);
        break;
      }
      case 3: {
        const p = this.pending.get(msg.invocationId);
        this.pending.delete(msg.invocationId);
        if (p) msg.error ? p.reject(new Error(msg.error)) : p.resolve(msg.result);
        break;
      }
      case 7:
        this.onEvent("log", `server closed the connection${msg.error ? ": " + msg.error : ""}`);
        this.lost(msg.error || null, msg.allowReconnect === true || !msg.error);
        break;
      default: break; // Pings (6) only reset the timeout.
    }
  }

  startKeepAlive() {
    this.lastReceived = Date.now();
    if (this.transport === "LongPolling") return;   // long polling keeps itself alive
    this.keepAlive = setInterval(() => {
      if (Date.now() - this.lastReceived > 30000) { this.lost("server timeout"); return; }
      try { this.write({ type: 6 }); } catch {}
    }, 15000);
  }

  // --- reconnecting -------------------------------------------------------------------

  async lost(error, allowReconnect = true) {
    if (this.state !== "connected" || this.stopped) return;
    await this.closeTransport(false);
    for (const p of this.pending.values()) p.reject(new Error("connection lost"));
    this.pending.clear();
    if (!allowReconnect) { this.setState("disconnected"); return; }
    this.onEvent("log", `connection lost${error ? ": " + error : ""}; reconnecting`);
    this.setState("reconnecting");
    for (const delay of DELAYS) {
      await new Promise((r) => setTimeout(r, delay));
      if (this.stopped) return;
      try { await this.connect(); this.onEvent("reconnected", this.connectionId); return; }
      catch (e) { this.onEvent("log", `reconnect failed: ${e.message}`); }
    }
    this.setState("disconnected");
  }
}
