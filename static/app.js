// The chat page: wires the hub's methods and events (docs/chat-hub.md) to the UI.
import { HubConnection } from "./signalr-lite.js";

const $ = (id) => document.getElementById(id);
const TRANSPORTS = { ws: "WebSockets", websockets: "WebSockets", sse: "ServerSentEvents",
  serversentevents: "ServerSentEvents", lp: "LongPolling", longpolling: "LongPolling" };
const wanted = new URLSearchParams(location.search).get("transport");
const forced = wanted ? TRANSPORTS[wanted.toLowerCase()] || null : null;
let room = null;
let dmTarget = null;

for (const a of document.querySelectorAll(".transports a")) {
  const t = new URLSearchParams(a.search).get("transport");
  if ((t ? TRANSPORTS[t] : null) === forced) a.classList.add("active");
}

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;   // never innerHTML with user text
  return node;
}

function logEvent(text) {
  const li = el("li", "", `${new Date().toLocaleTimeString()} ${text}`);
  $("events").prepend(li);
}

function addLine(node) {
  const list = $("messages");
  list.append(node);
  list.scrollTop = list.scrollHeight;
}

function system(text) { addLine(el("li", "system", text)); }

const hub = new HubConnection("/chat", {
  transport: forced,
  onEvent: (kind, detail) => {
    if (kind === "state") {
      $("state").textContent = detail;
      $("dot").className = `dot ${detail}`;
      logEvent(`state: ${detail}`);
    } else if (kind === "reconnected") {
      onConnected();
    } else {
      logEvent(detail);
    }
  },
});

hub.on("ReceiveMessage", (m) => {
  const mine = m.connectionId === hub.connectionId;
  const li = el("li", `msg${mine ? " mine" : ""}`);
  const meta = el("div", "meta");
  const who = el("span", "who", m.name);
  who.title = "Send a private message";
  who.onclick = () => { dmTarget = { id: m.connectionId, name: m.name }; $("text").placeholder = `Private message to ${m.name}…`; $("text").focus(); };
  meta.append(who, el("span", "badge", m.instance), el("span", "badge", m.transport));
  if (m.room) meta.append(el("span", "badge", `#${m.room}`));
  if (m.to || m.toUser) meta.append(el("span", "badge private", "private"));
  meta.append(el("time", "", new Date(m.sentAt).toLocaleTimeString()));
  li.append(meta, el("div", "text", m.text));
  addLine(li);
});

hub.on("Send", (message) => system(`(broadcast) ${message}`));

// `AskClient` from another connection: the server asks this page for an answer.
hub.on("Ask", (from, question) => {
  system(`${from} asked: ${question}`);
  return `${$("transport").textContent} page on ${$("instance").textContent} got "${question}"`;
});

hub.on("Presence", (p) => {
  const where = p.room ? ` #${p.room}` : "";
  const text = { joined: "joined", left: "left", renamed: "is now called", joinedRoom: "joined", leftRoom: "left" }[p.kind];
  system(p.kind === "renamed" ? `${p.name} changed their name` : `${p.name} ${text}${where} (on ${p.instance})`);
});

async function onConnected() {
  const me = await hub.invoke("WhoAmI");
  $("transport").textContent = me.transport;
  $("instance").textContent = me.instance;
  $("connectionId").textContent = me.connectionId;
  logEvent(`served by ${me.instance} over ${me.transport}`);
  const name = localStorage.getItem("stickless-name");
  if (name) await hub.invoke("SetName", name).catch((e) => logEvent(e.message));
  if (room) await hub.invoke("JoinRoom", room).catch((e) => logEvent(e.message));
}

$("composer").addEventListener("submit", async (e) => {
  e.preventDefault();
  const text = $("text").value.trim();
  if (!text) return;
  try {
    if (dmTarget) await hub.invoke("SendTo", dmTarget.id, text);
    else if (room) await hub.invoke("SendToRoom", room, text);
    else await hub.invoke("SendMessage", text);
    $("text").value = "";
    if (dmTarget) { dmTarget = null; $("text").placeholder = "Say something…"; }
  } catch (err) { logEvent(`send failed: ${err.message}`); }
});

$("nameForm").addEventListener("submit", async (e) => {
  e.preventDefault();
  try {
    const name = await hub.invoke("SetName", $("name").value);
    localStorage.setItem("stickless-name", name);
    logEvent(`name set to ${name}`);
  } catch (err) { logEvent(err.message); }
});

$("roomForm").addEventListener("submit", async (e) => {
  e.preventDefault();
  try {
    if (room) {
      await hub.invoke("LeaveRoom", room);
      room = null;
    } else {
      room = await hub.invoke("JoinRoom", $("room").value);
    }
  } catch (err) { logEvent(err.message); }
  $("roomButton").textContent = room ? "Leave" : "Join";
  $("roomHint").textContent = room ? `Messages go to #${room}.` : "Not in a room: messages go to everyone.";
});

$("name").value = localStorage.getItem("stickless-name") || "";
hub.start().then(onConnected).catch((e) => { logEvent(`could not connect: ${e.message}`); $("state").textContent = "disconnected"; });
