// stickless chat: wires the chat hub (docs/chat-hub.md) to the page.
// All user-provided text goes through textContent; nothing user-controlled reaches innerHTML.

import { HubConnection, backoff, normalizeTransport } from "./signalr-lite.js";

const $ = (id) => document.getElementById(id);
const NAME_KEY = "stickless.name";
const TYPING_EVERY_MS = 3000;   // send Typing at most this often while keys are pressed
const TYPING_SHOWN_MS = 5000;   // show "… is typing" this long after the last Typing

const STATE_LABELS = {
  connecting: "Connecting…", connected: "Connected",
  reconnecting: "Reconnecting…", disconnected: "Disconnected",
};
const TRANSPORT_LABELS = { WebSockets: "WebSockets", ServerSentEvents: "SSE", LongPolling: "Long Polling" };

// ---- page state -------------------------------------------------------------------

const requested = new URLSearchParams(location.search).get("transport");
const forced = normalizeTransport(requested);
// The name is chosen before joining (remembered, or a guest name kept on this device), so
// others see one "Ann joined" rather than a guest joining and then renaming.
// `?name=Ann` picks it in the address (and remembers it).
const named = new URLSearchParams(location.search).get("name")?.trim();
if (named) localStorage.setItem(NAME_KEY, named);
const me = { connectionId: null, instance: null, transport: null, name: named || localStorage.getItem(NAME_KEY) || guestName() };
const rooms = new Set();        // rooms we are in (joined again after every reconnect)
const names = new Map();        // connectionId → last known display name
const online = new Map();       // connectionId → member {connectionId, name, instance, since}
const seen = new Set();         // ids of the messages shown: history on reconnect adds only new ones
const typing = new Map();       // connectionId → {name, room, until}
const outbox = [];              // messages written while offline: [{value, text, node}]
let onlineTotal = 0;            // members cluster-wide (the list may name fewer)
let retryTimer = null;
let retryAttempt = 0;
let everConnected = false;      // connection dividers appear in the chat only after the first success
let joined = false;             // Join succeeded on the current connection

function guestName() {
  const name = `guest-${Math.floor(1000 + Math.random() * 9000)}`;
  localStorage.setItem(NAME_KEY, name);
  return name;
}

const hub = new HubConnection("/chat", { transport: forced });
window.hub = hub; // handy in the browser console: hub.invoke("WhoAmI"), hub.send("Send", "hi")

// ---- small DOM helpers ------------------------------------------------------------

/** Creates an element; `text` is always set with textContent (never parsed as HTML). */
function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function clock(date) {
  return date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function clockWithSeconds(date) {
  return date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23" });
}

function hueOf(value) {
  let hash = 0;
  for (const ch of String(value)) hash = (hash * 31 + ch.codePointAt(0)) % 360;
  return hash;
}

function initials(name) {
  const parts = String(name).replace(/[^\p{L}\p{N} ]/gu, " ").trim().split(/\s+/);
  const letters = parts.length > 1 ? parts[0][0] + parts[1][0] : [...(parts[0] || "?")][0];
  return letters.toUpperCase();
}

// ---- message list -----------------------------------------------------------------

const list = $("messages");

function append(node) {
  if (!node.classList.contains("divider")) $("empty")?.remove();
  const nearBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 120;
  list.append(node);
  while (list.children.length > 500) list.firstElementChild.remove();
  if (nearBottom || node.classList.contains("mine")) scrollToEnd();
}

function timeEl(date) {
  const time = el("time", "", clock(date));
  time.dateTime = date.toISOString();
  time.title = date.toLocaleString();
  return time;
}

/** A notice in the chat, with its time. */
// Stay at the newest message while the list changes size (composer grows, window resizes),
// unless the reader scrolled up.
let pinned = true;
list.addEventListener("scroll", () => { pinned = list.scrollHeight - list.scrollTop - list.clientHeight < 40; });
new ResizeObserver(() => { if (pinned) scrollToEnd(); }).observe(list);

function scrollToEnd() {
  list.style.scrollBehavior = "auto";
  list.scrollTop = list.scrollHeight;
  list.style.scrollBehavior = "";
}

function systemLine(text, kind = "", at = Date.now()) {
  const li = el("li", `system ${kind}`.trim());
  li.append(el("span", "", text), timeEl(new Date(at)));
  append(li);
  return li;
}

const URL_PATTERN = /\bhttps?:\/\/[^\s<>"']+/gi;

/** Text with its http(s) links made clickable, built from text nodes and <a> elements only:
 * nothing the sender wrote is parsed as HTML, and no other scheme (javascript:, data:)
 * becomes a link. */
function linkified(text) {
  const fragment = document.createDocumentFragment();
  let last = 0;
  for (const match of text.matchAll(URL_PATTERN)) {
    const raw = match[0].replace(/[.,;:!?)\]]+$/, ""); // trailing punctuation is prose
    let url;
    try { url = new URL(raw); } catch { continue; }
    if (url.protocol !== "http:" && url.protocol !== "https:") continue;
    fragment.append(document.createTextNode(text.slice(last, match.index)));
    const a = el("a", "", raw);
    a.href = url.href;
    a.rel = "noopener noreferrer nofollow";
    a.target = "_blank";
    fragment.append(a);
    last = match.index + raw.length;
  }
  fragment.append(document.createTextNode(text.slice(last)));
  return fragment;
}

function badge(text, className = "", title = "") {
  const node = el("span", `badge ${className}`.trim(), text);
  if (title) node.title = title;
  return node;
}

function transportBadge(transport) {
  const node = badge(TRANSPORT_LABELS[transport] || transport, "transport", `sent over ${transport}`);
  node.dataset.transport = transport;
  return node;
}

/** Renders a chat message {id, connectionId, name, text, instance, transport, room, to, toUser,
 * sentAt} once: a message already shown (same id) is skipped. */
function renderMessage(msg, { legacy = false, toName = null, mine: ours = false } = {}) {
  if (msg.id) {
    if (seen.has(msg.id)) return null;
    seen.add(msg.id);
  }
  typing.delete(msg.connectionId);
  renderTyping();
  const mine = ours || (!legacy && msg.connectionId === (hub.connectionId || me.connectionId));
  const direct = Boolean(msg.to || msg.toUser);
  const li = el("li", ["msg", mine && "mine", direct && "direct", legacy && "legacy"].filter(Boolean).join(" "));

  const avatar = el("div", "avatar", legacy ? "S" : initials(msg.name));
  avatar.setAttribute("aria-hidden", "true");
  avatar.style.setProperty("--hue", String(legacy ? 210 : hueOf(msg.connectionId)));

  const meta = el("div", "meta");
  if (mine || legacy) {
    meta.append(el("span", "sender", mine ? "You" : msg.name));
  } else {
    const sender = el("button", "sender", msg.name);
    sender.type = "button";
    sender.title = `Send ${msg.name} a direct message`;
    sender.addEventListener("click", () => startDirect(msg.connectionId, msg.name));
    meta.append(sender);
  }
  if (legacy) meta.append(badge("legacy Send", "", "the reference sample's Send target"));
  if (msg.instance) meta.append(badge(msg.instance, "", "instance the sender is connected to"));
  if (msg.transport) meta.append(transportBadge(msg.transport));
  if (msg.room) meta.append(badge(`#${msg.room}`, "room", "room message"));
  if (direct) meta.append(badge(toName ? `to ${toName}` : "direct", "direct", "only you two see this"));
  meta.append(timeEl(new Date(msg.sentAt || Date.now())));

  const body = el("div", "msg-body");
  const bubble = el("div", "bubble");
  bubble.append(linkified(String(msg.text ?? "")));
  body.append(meta, bubble);
  li.append(avatar, body);
  append(li);
  return li;
}

// ---- events panel -------------------------------------------------------------------

function logEvent(category, message, level = "info") {
  const li = el("li", `event ${level}`);
  const now = new Date();
  const time = el("time", "", clockWithSeconds(now));
  time.dateTime = now.toISOString();
  li.append(time, el("span", "tag", category), el("span", "text", message));
  const events = $("events");
  events.prepend(li);
  while (events.children.length > 200) events.lastElementChild.remove();
}

$("events-clear").addEventListener("click", () => $("events").replaceChildren());

// ---- connection status ----------------------------------------------------------------

function showState(state) {
  $("state-pill").dataset.state = state;
  $("state-text").textContent = STATE_LABELS[state];
  $("fact-state").textContent = STATE_LABELS[state];
  document.body.dataset.state = state;
  $("offline-hint").hidden = state === "connected";
  if (state !== "connected") { showIdentity(null); joined = false; }
  updateSendButton();
}

/** The banner over the chat: reconnecting, reconnected (briefly) or disconnected, with a
 * button that retries at once. */
let bannerTimer = null;
function banner(kind, text) {
  clearTimeout(bannerTimer);
  const node = $("banner");
  node.hidden = !kind;
  node.dataset.kind = kind || "";
  $("banner-text").textContent = text || "";
  $("banner-retry").hidden = kind !== "reconnecting" && kind !== "disconnected";
  if (kind === "reconnected") bannerTimer = setTimeout(() => banner(null), 4000);
}

function showIdentity(who) {
  const transport = who ? TRANSPORT_LABELS[who.transport] || who.transport : "—";
  $("top-transport").textContent = transport;
  $("fact-transport").textContent = who ? who.transport : (forced ? `${forced} (forced)` : "—");
  $("top-instance").textContent = who ? who.instance : "—";
  $("fact-instance").textContent = who ? who.instance : "—";
  $("fact-connection").textContent = who ? who.connectionId : "—";
}

for (const link of document.querySelectorAll(".switcher a")) {
  if ((link.dataset.transport || null) === forced) link.setAttribute("aria-current", "page");
}

hub.addEventListener("statechange", (e) => {
  showState(e.detail.state);
  if (e.detail.state !== "disconnected") clearRetry();
});

hub.addEventListener("log", (e) => {
  const { level, category, message } = e.detail;
  logEvent(category, message, level);
});

hub.addEventListener("reconnecting", () => {
  systemLine("Connection lost, reconnecting…", "divider");
  banner("reconnecting", "Connection lost. Reconnecting…");
});

hub.addEventListener("retrying", (e) => {
  const { attempt, delay } = e.detail;
  const when = delay >= 1000 ? `in ${Math.round(delay / 1000)} s` : "now";
  banner("reconnecting", `Connection lost. Reconnecting ${when} (attempt ${attempt})…`);
});

hub.addEventListener("connected", async (e) => {
  const { reconnected } = e.detail;
  retryAttempt = 0;
  showIdentity({ transport: hub.transportName, connectionId: hub.connectionId, instance: "…" });
  if (reconnected || everConnected) banner("reconnected", "Reconnected. Messages sent meanwhile are below.");
  else banner(null);
  await join(reconnected || everConnected);
  everConnected = true;
});

hub.addEventListener("disconnected", (e) => {
  if (e.detail.error && everConnected) systemLine(`Disconnected: ${e.detail.error.message}`, "divider");
  if (e.detail.error) scheduleRetry();
});

/** Comes online: Join(name) names us once and answers with who is online and the lobby's
 * recent messages; then the rooms are joined again, their history fetched, and messages
 * written while offline go out. */
async function join(again) {
  let result;
  try {
    result = await hub.invoke("Join", me.name);
  } catch (error) {
    logEvent("join", `Join as ${me.name} failed: ${error.message}`, "error");
    if (hub.state !== "connected") return; // the next connection joins again
    // The server refused the name (too long, empty…): join as a guest and say why.
    $("name-hint").textContent = error.message;
    me.name = guestName();
    try {
      result = await hub.invoke("Join", me.name);
    } catch (again) {
      logEvent("join", `Join failed: ${again.message}`, "error");
      return;
    }
  }
  joined = true;
  me.connectionId = result.connectionId; me.instance = result.instance; me.transport = result.transport;
  me.name = result.name;
  $("name-input").value = me.name;
  showIdentity(result);
  logEvent("join", `Joined as ${result.name} on instance ${result.instance} over ${result.transport}`, "good");
  systemLine(`${again ? "Reconnected" : "Connected"} to instance ${result.instance} over ${TRANSPORT_LABELS[result.transport] || result.transport}`, "divider");
  setOnline(result.online, result.onlineCount);
  const fresh = result.history.filter((m) => !seen.has(m.id));
  if (fresh.length && !again) systemLine(`Earlier messages`, "divider history-divider");
  for (const msg of fresh) renderMessage(msg);
  if (!again) scrollToEnd();
  for (const room of rooms) {
    try {
      await hub.invoke("JoinRoom", room);
      for (const msg of await hub.invoke("History", room)) renderMessage(msg);
    } catch (error) {
      logEvent("rooms", `Could not rejoin #${room}: ${error.message}`, "error");
    }
  }
  updateSendButton();
  flushOutbox();
}

// While the first start keeps failing, try again with the same capped backoff.
function scheduleRetry() {
  clearRetry();
  const delay = backoff(++retryAttempt);
  let left = Math.ceil(delay / 1000);
  const tick = () => {
    if (left <= 0) { clearRetry(); connect(); return; }
    banner("disconnected", `Cannot reach the server. Retrying in ${left} s…`);
    left -= 1;
    retryTimer = setTimeout(tick, 1000);
  };
  tick();
}

function clearRetry() { clearTimeout(retryTimer); retryTimer = null; }

async function connect() {
  try {
    await hub.start();
  } catch {
    /* reported through the "log" and "disconnected" events */
  }
}

/** Now, not after the current wait: the retry button, the browser coming back online, the
 * tab becoming visible. */
function retryNow() {
  if (hub.state === "reconnecting") hub.reconnectNow();
  else if (hub.state === "disconnected") { clearRetry(); connect(); }
}
$("banner-retry").addEventListener("click", retryNow);
window.addEventListener("online", retryNow);
document.addEventListener("visibilitychange", () => { if (document.visibilityState === "visible") retryNow(); });

// ---- who is online ---------------------------------------------------------------------

/** How many connections a name has among the members (a person with two tabs is one name). */
function connectionsOf(name) {
  let n = 0;
  for (const m of online.values()) if (m.name === name) n += 1;
  return n;
}

function setOnline(members, total) {
  online.clear();
  for (const m of members) { online.set(m.connectionId, m); names.set(m.connectionId, m.name); }
  onlineTotal = Math.max(total ?? members.length, online.size);
  renderOnline();
}

function renderOnline() {
  const byName = new Map();
  for (const m of online.values()) {
    const entry = byName.get(m.name) || { name: m.name, ids: [], instances: new Set() };
    entry.ids.push(m.connectionId);
    entry.instances.add(m.instance);
    byName.set(m.name, entry);
  }
  const ul = $("online");
  ul.replaceChildren();
  const sorted = [...byName.values()].sort((a, b) => a.name.localeCompare(b.name));
  for (const entry of sorted) {
    const li = el("li", "person");
    const self = entry.ids.includes(hub.connectionId);
    const dot = el("span", "dot");
    dot.setAttribute("aria-hidden", "true");
    const button = el("button", "person-name", self ? `${entry.name} (you)` : entry.name);
    button.type = "button";
    button.disabled = self;
    button.title = `${entry.ids.length} connection(s) on ${[...entry.instances].join(", ")}`;
    if (!self) button.addEventListener("click", () => { startDirect(entry.ids[0], entry.name); setPanel(false); });
    li.append(dot, button);
    if (entry.ids.length > 1) li.append(el("span", "muted", `×${entry.ids.length}`));
    ul.append(li);
  }
  const total = Math.max(onlineTotal, online.size);
  $("online-count").textContent = String(total);
  $("online-count-top").textContent = String(total);
  $("online-hint").textContent = total > online.size
    ? `Showing ${online.size} of ${total}. Click a name to message that person directly.`
    : "Click a name to message that person directly.";
}

let refreshTimer = null;
/** A batch left events out: the list is only approximate; ask for it again, once, a little
 * later and at a random moment so that a crowd of pages does not ask at the same time. */
function refreshOnlineSoon() {
  if (refreshTimer) return;
  refreshTimer = setTimeout(async () => {
    refreshTimer = null;
    if (hub.state !== "connected") return;
    try {
      const members = await hub.invoke("Online");
      setOnline(members, members.length);
    } catch { /* the next batch tries again */ }
  }, 2000 + Math.random() * 8000);
}

// A person whose last connection left is announced a few seconds later, and not at all if
// they come back meanwhile: a reconnect (a failover, a flaky network) is not news.
const LEFT_GRACE_MS = 8000;
const leaving = new Map(); // name → timer of the pending "left" notice

/** One coalesced batch {events, omitted}: notices only when a name comes or goes (a second
 * tab or a reconnect of the same person is not news), renames with the old name. */
function applyPresence(batch) {
  for (const ev of batch.events) {
    const self = ev.connectionId === hub.connectionId;
    if (ev.kind === "joined") {
      const before = connectionsOf(ev.name);
      if (!online.has(ev.connectionId)) onlineTotal += 1;
      online.set(ev.connectionId, { connectionId: ev.connectionId, name: ev.name, instance: ev.instance, since: ev.at });
      if (leaving.has(ev.name)) { clearTimeout(leaving.get(ev.name)); leaving.delete(ev.name); }
      else if (before === 0 && !self) systemLine(`${ev.name} joined`, "presence", ev.at);
    } else if (ev.kind === "left") {
      const known = online.delete(ev.connectionId);
      if (known || onlineTotal > online.size) onlineTotal -= 1;
      if (connectionsOf(ev.name) === 0 && !leaving.has(ev.name) && ev.name !== me.name) {
        leaving.set(ev.name, setTimeout(() => {
          leaving.delete(ev.name);
          if (connectionsOf(ev.name) === 0) systemLine(`${ev.name} left`, "presence", ev.at);
        }, LEFT_GRACE_MS));
      }
      typing.delete(ev.connectionId);
      markGone(ev.connectionId);
    } else if (ev.kind === "renamed") {
      const member = online.get(ev.connectionId);
      if (member) member.name = ev.name;
      systemLine(self ? `You are now ${ev.name}` : `${ev.oldName ?? "Someone"} is now ${ev.name}`, "presence", ev.at);
    }
    if (ev.kind !== "left") names.set(ev.connectionId, ev.name);
  }
  if (batch.omitted > 0) {
    systemLine(`…and ${batch.omitted} more joined, left or renamed`, "presence");
    refreshOnlineSoon();
  }
  onlineTotal = Math.max(onlineTotal, online.size);
  renderOnline();
  renderTyping();
}

// ---- hub targets --------------------------------------------------------------------

hub.on("ReceiveMessage", (msg) => {
  names.set(msg.connectionId, msg.name);
  renderMessage(msg, { toName: msg.to || msg.toUser ? "you" : null });
});

// `AskClient` from another connection: the server asks this page for an answer.
hub.on("Ask", (from, question) => {
  systemLine(`${from} asked: ${question}`, "presence", Date.now());
  return `${me.name ?? "a page"} (${me.transport ?? "?"} on ${me.instance ?? "?"}) got "${question}"`;
});

hub.on("Send", (message) => {
  renderMessage({ name: "Broadcast", text: message, sentAt: Date.now() }, { legacy: true });
});

hub.on("Presence", (event) => {
  if (Array.isArray(event?.events)) return applyPresence(event);
  // Room events come one by one: rooms are small.
  const self = event.connectionId === hub.connectionId;
  const who = self ? "You" : event.name;
  switch (event.kind) {
    case "joinedRoom": systemLine(`${who} joined #${event.room}`, "presence", event.at); break;
    case "leftRoom": systemLine(`${who} left #${event.room}`, "presence", event.at); break;
    default: logEvent("presence", `Unknown presence event '${event.kind}'`, "warn");
  }
});

hub.on("Typing", (ev) => {
  typing.set(ev.connectionId, { name: ev.name, room: ev.room, until: Date.now() + TYPING_SHOWN_MS });
  renderTyping();
  setTimeout(renderTyping, TYPING_SHOWN_MS + 50);
});

function renderTyping() {
  const now = Date.now();
  const who = [];
  for (const [id, t] of typing) {
    if (t.until < now) typing.delete(id);
    else if (!who.includes(t.name)) who.push(t.room ? `${t.name} (#${t.room})` : t.name);
  }
  $("typing").textContent = who.length === 0 ? ""
    : who.length === 1 ? `${who[0]} is typing…`
    : who.length <= 3 ? `${who.join(", ")} are typing…`
    : "Several people are typing…";
}

// ---- composing ----------------------------------------------------------------------

const target = $("target");
const input = $("message-input");

function describeTarget() {
  const value = target.value;
  if (value.startsWith("room:")) {
    $("scope-title").textContent = `#${value.slice(5)}`;
    $("scope-sub").textContent = "Only members of this room receive these messages, on every instance.";
  } else if (value.startsWith("dm:")) {
    $("scope-title").textContent = `Direct message to ${target.selectedOptions[0].dataset.name}`;
    $("scope-sub").textContent = "Only that person receives it, whichever instance holds their connection.";
  } else {
    $("scope-title").textContent = "Everyone";
    $("scope-sub").textContent = "Messages go to every connected client, whichever instance holds it.";
  }
}

function ensureOption(value, label, data = {}) {
  let option = [...target.options].find((o) => o.value === value);
  if (!option) {
    option = el("option", "", label);
    option.value = value;
    Object.assign(option.dataset, data);
    target.append(option);
  }
  return option;
}

function startDirect(connectionId, name) {
  const option = ensureOption(`dm:${connectionId}`, `@${name} (direct)`, { name });
  option.textContent = `@${name} (direct)`;
  option.dataset.name = name;
  option.disabled = false;
  target.value = option.value;
  describeTarget();
  input.focus();
}

/** A direct-message recipient left: keep the option, but it can no longer be picked. */
function markGone(connectionId) {
  const option = [...target.options].find((o) => o.value === `dm:${connectionId}`);
  if (!option) return;
  option.textContent = `@${option.dataset.name} (left)`;
  option.disabled = true;
  if (target.value === option.value) { target.value = "all"; describeTarget(); }
}

target.addEventListener("change", describeTarget);

function updateSendButton() {
  const button = $("send-button");
  const ready = hub.state === "connected" && joined;
  button.textContent = ready ? "Send" : "Queue";
  button.title = ready ? "Send" : "Offline: the message waits and goes out when the connection is back";
  button.disabled = false;
}

/** Shows a message of ours that is not delivered yet (queued or failed), with its status. */
function pendingBubble(text, status) {
  const li = el("li", "msg mine pending");
  const body = el("div", "msg-body");
  const meta = el("div", "meta");
  const state = el("span", "pending-state", status);
  meta.append(el("span", "sender", "You"), state);
  const bubble = el("div", "bubble");
  bubble.append(linkified(text));
  body.append(meta, bubble);
  li.append(body);
  append(li);
  return li;
}

function setPending(item, status, failed = false) {
  item.node.classList.toggle("failed", failed);
  const state = item.node.querySelector(".pending-state");
  state.replaceChildren(status);
  if (failed) {
    const again = el("button", "button ghost small", "Retry");
    again.type = "button";
    again.addEventListener("click", () => { setPending(item, "Waiting for the connection…"); outbox.push(item); flushOutbox(); });
    state.append(" ", again);
  }
}

async function deliver(value, text) {
  if (value.startsWith("room:")) {
    await hub.invoke("SendToRoom", value.slice(5), text);
  } else if (value.startsWith("dm:")) {
    // A direct message goes to its recipient only; the server hands us our copy.
    const msg = await hub.invoke("SendTo", value.slice(3), text);
    const option = [...target.options].find((o) => o.value === value);
    renderMessage(msg, { toName: option?.dataset.name, mine: true });
  } else {
    await hub.invoke("SendMessage", text);
  }
}

let flushing = false;
/** Sends what was written while offline, in order; stops at the first failure. */
async function flushOutbox() {
  if (flushing) return;
  flushing = true;
  try {
    while (outbox.length && hub.state === "connected" && joined) {
      const item = outbox[0];
      setPending(item, "Sending…");
      try {
        await deliver(item.value, item.text);
        outbox.shift();
        item.node.remove();
      } catch (error) {
        if (hub.state === "connected") { // refused by the server: it will not go through later either
          outbox.shift();
          setPending(item, `Not sent: ${error.message}`, true);
        } else {
          setPending(item, "Not sent yet: waiting for the connection…");
          break;
        }
      }
    }
  } finally {
    flushing = false;
  }
}

async function sendCurrent() {
  const text = input.value.trim();
  if (!text) return;
  const value = target.value;
  input.value = "";
  autosize();
  lastTypingSent = 0;
  if (hub.state !== "connected" || !joined || outbox.length) {
    // Offline: keep it, say so, send it once the connection is back.
    const item = { value, text, node: null };
    item.node = pendingBubble(text, "Waiting for the connection…");
    outbox.push(item);
    flushOutbox();
    return;
  }
  try {
    await deliver(value, text);
  } catch (error) {
    const item = { value, text, node: pendingBubble(text, "") };
    if (hub.state === "connected") {
      setPending(item, `Not sent: ${error.message}`, true);
    } else {
      setPending(item, "Not sent yet: waiting for the connection…");
      outbox.push(item);
    }
    logEvent("send", `Not sent: ${error.message}`, "error");
  } finally {
    input.focus();
  }
}

function autosize() {
  input.style.height = "auto";
  input.style.height = `${Math.min(input.scrollHeight + 2, 144)}px`;
}

let lastTypingSent = 0;
function announceTyping() {
  if (hub.state !== "connected" || !joined || !input.value.trim()) return;
  const now = Date.now();
  if (now - lastTypingSent < TYPING_EVERY_MS) return;
  lastTypingSent = now;
  const value = target.value;
  if (value.startsWith("dm:")) return; // not announced to everybody
  hub.send("Typing", value.startsWith("room:") ? value.slice(5) : null).catch(() => {});
}

$("composer").addEventListener("submit", (e) => { e.preventDefault(); sendCurrent(); });
input.addEventListener("input", () => { autosize(); announceTyping(); });
input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); sendCurrent(); }
});

// ---- name -----------------------------------------------------------------------------

async function applyName(name) {
  try {
    const accepted = await hub.invoke("SetName", name);
    me.name = accepted;
    localStorage.setItem(NAME_KEY, accepted);
    $("name-input").value = accepted;
    if (me.connectionId) names.set(me.connectionId, accepted);
    $("name-hint").textContent = `You appear as “${accepted}”. Remembered on this device.`;
    logEvent("profile", `Name set to ${accepted}`, "good");
  } catch (error) {
    $("name-hint").textContent = error.message;
    logEvent("profile", `Name rejected: ${error.message}`, "error");
  }
}

$("name-input").value = me.name;
$("name-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const name = $("name-input").value.trim();
  if (!name) return;
  if (hub.state !== "connected") {
    // Not online: remembered, and used by the next Join.
    me.name = name;
    localStorage.setItem(NAME_KEY, name);
    $("name-hint").textContent = `You will appear as “${name}” once connected.`;
    return;
  }
  applyName(name);
});

// ---- rooms ----------------------------------------------------------------------------

function renderRooms() {
  const ul = $("rooms");
  ul.replaceChildren();
  for (const room of rooms) {
    const li = el("li", "room-chip");
    const leave = el("button", "", "×");
    leave.type = "button";
    leave.setAttribute("aria-label", `Leave #${room}`);
    leave.title = `Leave #${room}`;
    leave.addEventListener("click", () => leaveRoom(room));
    li.append(el("span", "", `#${room}`), leave);
    ul.append(li);
  }
  for (const option of [...target.options]) {
    if (option.value.startsWith("room:") && !rooms.has(option.value.slice(5))) option.remove();
  }
  for (const room of rooms) ensureOption(`room:${room}`, `#${room}`);
  $("rooms-hint").textContent = rooms.size
    ? "Pick a room under “To” to talk to its members only."
    : "Join a room, then pick it under “To” to talk to its members only.";
  describeTarget();
}

$("room-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const wanted = $("room-input").value.trim();
  if (!wanted) return;
  try {
    const room = await hub.invoke("JoinRoom", wanted);
    rooms.add(room);
    $("room-input").value = "";
    renderRooms();
    for (const msg of await hub.invoke("History", room)) renderMessage(msg);
    target.value = `room:${room}`;
    describeTarget();
    logEvent("rooms", `Joined #${room}`, "good");
  } catch (error) {
    $("rooms-hint").textContent = error.message;
    logEvent("rooms", `Could not join: ${error.message}`, "error");
  }
});

async function leaveRoom(room) {
  try {
    await hub.invoke("LeaveRoom", room);
    systemLine(`You left #${room}`);
    logEvent("rooms", `Left #${room}`);
  } catch (error) {
    logEvent("rooms", `Could not leave #${room}: ${error.message}`, "error");
    return;
  }
  rooms.delete(room);
  renderRooms();
}

// ---- side panel as a drawer on narrow screens -------------------------------------------

function setPanel(open) {
  $("side").classList.toggle("open", open);
  $("backdrop").hidden = !open;
  $("panel-toggle").setAttribute("aria-expanded", String(open));
  if (open) $("panel-close").focus();
}
$("panel-toggle").addEventListener("click", () => setPanel(!$("side").classList.contains("open")));
$("panel-close").addEventListener("click", () => { setPanel(false); $("panel-toggle").focus(); });
$("backdrop").addEventListener("click", () => setPanel(false));
document.addEventListener("keydown", (e) => { if (e.key === "Escape" && $("side").classList.contains("open")) setPanel(false); });

// ---- go -----------------------------------------------------------------------------------

if (requested && !forced) {
  logEvent("transport", `Unknown transport '${requested}' in the address; using automatic selection`, "warn");
}
showState("disconnected");
showIdentity(null);
renderOnline();
// Tell the server at once that the tab is gone (for Long Polling, a DELETE with
// keepalive: true, which outlives the page) instead of letting it time the connection out.
window.addEventListener("pagehide", () => { hub.stop(); });
window.addEventListener("pageshow", (e) => { // back from the back/forward cache
  if (e.persisted && hub.state === "disconnected") { clearRetry(); connect(); }
});
connect();
