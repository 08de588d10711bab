// stickless chat: wires the chat hub (docs/chat-hub.md) to the page.
// All user-provided text goes through textContent; nothing user-controlled reaches innerHTML.

import { HubConnection, normalizeTransport } from "./signalr-lite.js";

const $ = (id) => document.getElementById(id);
const NAME_KEY = "stickless.name";
const RETRY_SECONDS = 15; // how long to wait before starting again once we are disconnected

const STATE_LABELS = {
  connecting: "Connecting…", connected: "Connected",
  reconnecting: "Reconnecting…", disconnected: "Disconnected",
};
const TRANSPORT_LABELS = { WebSockets: "WebSockets", ServerSentEvents: "SSE", LongPolling: "Long Polling" };

// ---- page state -------------------------------------------------------------------

const requested = new URLSearchParams(location.search).get("transport");
const forced = normalizeTransport(requested);
const me = { connectionId: null, instance: null, transport: null, name: localStorage.getItem(NAME_KEY) || "" };
const rooms = new Set();        // rooms we are in (joined again after every reconnect)
const names = new Map();        // connectionId → last known display name
let retryTimer = null;
let everConnected = false;      // connection dividers appear in the chat only after the first success

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
  if (nearBottom || node.classList.contains("mine")) list.scrollTop = list.scrollHeight;
}

function systemLine(text, kind = "") {
  append(el("li", `system ${kind}`.trim(), text));
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

/** Renders a chat message: {connectionId, name, text, instance, transport, room, to, toUser, sentAt}. */
function renderMessage(msg, { legacy = false, toName = null } = {}) {
  const mine = !legacy && msg.connectionId === (hub.connectionId || me.connectionId);
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
  const sent = new Date(msg.sentAt || Date.now());
  const time = el("time", "", clock(sent));
  time.dateTime = sent.toISOString();
  time.title = sent.toLocaleString();
  meta.append(time);

  const body = el("div", "msg-body");
  body.append(meta, el("div", "bubble", msg.text));
  li.append(avatar, body);
  append(li);
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

function showState(state, extra = "") {
  $("state-pill").dataset.state = state;
  $("state-text").textContent = STATE_LABELS[state] + extra;
  $("fact-state").textContent = STATE_LABELS[state];
  $("send-button").disabled = state !== "connected";
  $("retry").hidden = state !== "disconnected";
  if (state !== "connected") showIdentity(null);
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

hub.addEventListener("reconnecting", () => systemLine("Connection lost, reconnecting…", "divider"));

hub.addEventListener("connected", async (e) => {
  const { reconnected } = e.detail;
  everConnected = true;
  showIdentity({ transport: hub.transportName, connectionId: hub.connectionId, instance: "…" });
  try {
    const who = await hub.invoke("WhoAmI");
    me.connectionId = who.connectionId; me.instance = who.instance; me.transport = who.transport;
    names.set(who.connectionId, me.name || `guest-${who.connectionId.slice(0, 4)}`);
    showIdentity(who);
    logEvent("whoami", `Served by instance ${who.instance} over ${who.transport}`, "good");
    systemLine(`${reconnected ? "Reconnected" : "Connected"} to instance ${who.instance} over ${TRANSPORT_LABELS[who.transport] || who.transport}`, "divider");
  } catch (error) {
    logEvent("whoami", `WhoAmI failed: ${error.message}`, "error");
  }
  // A new connection knows nothing about us: send the name and rejoin the rooms.
  if (me.name) await applyName(me.name, { quiet: true });
  for (const room of rooms) {
    await hub.invoke("JoinRoom", room).catch((error) => logEvent("rooms", `Could not rejoin #${room}: ${error.message}`, "error"));
  }
});

hub.addEventListener("disconnected", (e) => {
  if (e.detail.error && everConnected) systemLine(`Disconnected: ${e.detail.error.message}`, "divider");
  scheduleRetry();
});

// While disconnected, try again every RETRY_SECONDS (with a visible countdown).
function scheduleRetry() {
  clearRetry();
  let left = RETRY_SECONDS;
  const tick = () => {
    if (left <= 0) { clearRetry(); connect(); return; }
    $("state-text").textContent = `Disconnected · retrying in ${left}s`;
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

$("retry").addEventListener("click", () => { clearRetry(); connect(); });

// ---- hub targets --------------------------------------------------------------------

hub.on("ReceiveMessage", (msg) => {
  names.set(msg.connectionId, msg.name);
  renderMessage(msg);
});

hub.on("Send", (message) => {
  renderMessage({ name: "Broadcast", text: message, sentAt: Date.now() }, { legacy: true });
});

hub.on("Presence", (event) => {
  const self = event.connectionId === (hub.connectionId || me.connectionId);
  const who = self ? "You" : event.name;
  const where = event.instance ? ` (instance ${event.instance})` : "";
  switch (event.kind) {
    case "joined": systemLine(`${who} joined${where}`); break;
    case "left": systemLine(`${who} left`); break;
    case "renamed": {
      const before = names.get(event.connectionId);
      systemLine(before && before !== event.name ? `${before} is now ${event.name}` : `${event.name} changed their name`);
      break;
    }
    case "joinedRoom": systemLine(`${who} joined #${event.room}`); break;
    case "leftRoom": systemLine(`${who} left #${event.room}`); break;
    default: logEvent("presence", `Unknown presence event '${event.kind}'`, "warn");
  }
  if (event.kind === "left") {
    names.delete(event.connectionId);
    markGone(event.connectionId);
  } else {
    names.set(event.connectionId, event.name);
  }
});

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
    $("scope-sub").textContent = "Only that connection receives it, whichever instance holds it.";
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

async function sendCurrent() {
  const text = input.value.trim();
  if (!text || hub.state !== "connected") return;
  const value = target.value;
  const button = $("send-button");
  button.disabled = true;
  try {
    if (value.startsWith("room:")) {
      await hub.invoke("SendToRoom", value.slice(5), text);
    } else if (value.startsWith("dm:")) {
      const to = value.slice(3);
      await hub.invoke("SendTo", to, text);
      // The server delivers a direct message to its recipient only: show our own copy.
      renderMessage({ connectionId: me.connectionId, name: names.get(me.connectionId) || me.name, text, instance: me.instance,
        transport: me.transport, to, sentAt: Date.now() }, { toName: target.selectedOptions[0].dataset.name });
    } else {
      await hub.invoke("SendMessage", text);
    }
    input.value = "";
    autosize();
  } catch (error) {
    logEvent("send", `Not sent: ${error.message}`, "error");
    systemLine(`Your message was not sent: ${error.message}`, "error");
  } finally {
    button.disabled = hub.state !== "connected";
    input.focus();
  }
}

function autosize() {
  input.style.height = "auto";
  input.style.height = `${Math.min(input.scrollHeight + 2, 144)}px`;
}

$("composer").addEventListener("submit", (e) => { e.preventDefault(); sendCurrent(); });
input.addEventListener("input", autosize);
input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); sendCurrent(); }
});

// ---- name -----------------------------------------------------------------------------

async function applyName(name, { quiet = false } = {}) {
  try {
    const accepted = await hub.invoke("SetName", name);
    me.name = accepted;
    localStorage.setItem(NAME_KEY, accepted);
    $("name-input").value = accepted;
    if (me.connectionId) names.set(me.connectionId, accepted);
    $("name-hint").textContent = `You appear as “${accepted}”. Remembered on this device.`;
    if (!quiet) systemLine(`You are now ${accepted}`);
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
  if (hub.state !== "connected") { $("name-hint").textContent = "Not connected yet; try again in a moment."; return; }
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
window.addEventListener("pagehide", () => { hub.stop(); }); // tell the server at once
window.addEventListener("pageshow", (e) => { // back from the back/forward cache
  if (e.persisted && hub.state === "disconnected") { clearRetry(); connect(); }
});
connect();
