// The demo page: pick a demo user, get a token from the local issuer (LISTENERS_DEMO_TOKEN_URL),
// open the WebSocket with it (Sec-WebSocket-Protocol: bearer, <token>) and keep the user's
// notifications and direct messages current from the events. "Mark read" sends notif.read,
// which writes read: true in Firestore; the notif.remove that follows takes the item away.
// Everything is written with textContent: no data becomes markup.
"use strict";

const $ = (id) => document.getElementById(id);
// Close codes after which reconnecting with a fresh token would not help (docs/websocket.md).
const FINAL = new Set([1008, 4002, 4003, 4004, 4005, 4006, 4007, 4009, 4010, 4013, 4017]);
const LOG_ROWS = 40;

let config = null;
let uid = null;
let socket = null;
let generation = 0; // bumped on every sign-in: callbacks of older sockets do nothing
let retries = 0;
let refreshTimer = null;
const notifications = new Map();
const messages = new Map();
const reading = new Set(); // doc_ids with a notif.read on its way

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function setConnection(text, kind) {
  $("connection").textContent = text;
  $("connection").className = "pill " + kind;
}

function when(iso) {
  if (!iso) return "";
  const date = new Date(iso);
  return isNaN(date) ? iso : date.toLocaleString();
}

function joined(...parts) {
  return parts.filter((part) => part).join(" · ");
}

function newestFirst(map) {
  return [...map.values()].sort((a, b) => {
    const x = a.timestamp || "", y = b.timestamp || "";
    if (!x || !y) return x ? -1 : y ? 1 : 0; // unreadable timestamps last
    return x < y ? 1 : x > y ? -1 : 0;
  });
}

async function fetchToken(user) {
  const url = new URL(config.token_url);
  url.searchParams.set("uid", user);
  const response = await fetch(url, { cache: "no-store" });
  if (!response.ok) throw new Error("token endpoint answered " + response.status);
  return response.json(); // {token, uid, expires_at}
}

async function start() {
  config = await (await fetch("/demo/config", { cache: "no-store" })).json();
  let users = [];
  try {
    users = (await (await fetch(config.token_url, { cache: "no-store" })).json()).users || [];
  } catch (error) {
    setConnection("token issuer unreachable", "bad");
  }
  const holder = $("users");
  for (const user of users) {
    const button = el("button", user);
    button.type = "button";
    button.dataset.uid = user;
    button.addEventListener("click", () => signIn(user));
    holder.append(button);
  }
  const wanted = decodeURIComponent(location.hash.slice(1));
  if (users.includes(wanted)) signIn(wanted);
}

function signIn(user) {
  generation += 1;
  if (socket) socket.close(1000, "switching user");
  socket = null;
  clearTimeout(refreshTimer);
  uid = user;
  retries = 0;
  notifications.clear();
  messages.clear();
  reading.clear();
  renderNotifications();
  renderMessages();
  $("log").replaceChildren();
  history.replaceState(null, "", "#" + encodeURIComponent(user));
  for (const button of $("users").children) button.classList.toggle("active", button.dataset.uid === user);
  $("who").textContent = "";
  $("hint").classList.add("hidden");
  connect(generation);
}

async function connect(mine) {
  setConnection("connecting…", "warn");
  let grant;
  try {
    grant = await fetchToken(uid);
  } catch (error) {
    return retry(mine, "no token");
  }
  if (mine !== generation) return;
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(`${scheme}//${location.host}${config.ws_path}`, ["bearer", grant.token]);
  socket = ws;
  ws.onmessage = (event) => {
    if (mine === generation) handle(JSON.parse(event.data), mine);
  };
  ws.onclose = (event) => {
    if (mine !== generation) return;
    socket = null;
    clearTimeout(refreshTimer);
    if (FINAL.has(event.code)) {
      setConnection(`closed ${event.code}: ${event.reason || "refused"}`, "bad");
    } else {
      retry(mine, `closed ${event.code}`);
    }
  };
}

function retry(mine, why) {
  if (mine !== generation) return;
  const delay = Math.min(10000, 500 * 2 ** retries);
  retries += 1;
  setConnection(`${why}; reconnecting in ${Math.round(delay / 1000)} s`, "warn");
  setTimeout(() => mine === generation && connect(mine), delay);
}

function scheduleRefresh(expiresAt, mine) {
  clearTimeout(refreshTimer);
  const delay = Math.max(5, expiresAt - Date.now() / 1000 - 60) * 1000;
  refreshTimer = setTimeout(async () => {
    if (mine !== generation || !socket) return;
    try {
      const grant = await fetchToken(uid);
      socket.send(JSON.stringify({ type: "auth.refresh", token: grant.token }));
    } catch (error) {
      scheduleRefresh(Date.now() / 1000 + 70, mine); // try again in ten seconds
    }
  }, delay);
}

function handle(message, mine) {
  const p = message.payload || {};
  switch (message.type) {
    case "auth.ok":
      retries = 0;
      setConnection("live", "ok");
      $("who").textContent = `${message.uid} · token until ${new Date(message.expires_at * 1000).toLocaleTimeString()}`;
      scheduleRefresh(message.expires_at, mine);
      break;
    case "notif.sync":
      notifications.clear();
      for (const item of p.notifications || []) notifications.set(item.doc_id, item);
      renderNotifications();
      break;
    case "notif.add":
    case "notif.update":
      notifications.set(p.doc_id, p);
      renderNotifications(p.doc_id);
      break;
    case "notif.remove":
      notifications.delete(p.doc_id);
      reading.delete(p.doc_id);
      renderNotifications();
      break;
    case "notif.read.failed":
      reading.delete(message.doc_id);
      renderNotifications();
      break;
    case "msg.sync":
      messages.clear();
      for (const item of p.messages || []) messages.set(item.doc_id, item);
      renderMessages();
      break;
    case "msg.add":
    case "msg.update":
      messages.set(p.doc_id, p);
      renderMessages(p.doc_id);
      break;
    case "msg.remove":
      messages.delete(p.doc_id);
      renderMessages();
      break;
  }
  log(message);
}

function log(message) {
  const p = message.payload || {};
  let detail = p.doc_id || message.doc_id || "";
  if (message.type === "notif.sync" || message.type === "msg.sync") {
    detail = `${p.count} item${p.count === 1 ? "" : "s"}`;
  }
  const tr = document.createElement("tr");
  tr.append(el("td", new Date().toLocaleTimeString(), "mono"), el("td", message.type, "mono"), el("td", detail, "mono"));
  const body = $("log");
  body.prepend(tr);
  while (body.children.length > LOG_ROWS) body.lastChild.remove();
}

function markRead(docId) {
  if (!socket || reading.has(docId)) return;
  reading.add(docId);
  socket.send(JSON.stringify({ type: "notif.read", doc_id: docId }));
  renderNotifications();
}

function renderNotifications(flash) {
  const list = $("notifications");
  $("notif-count").textContent = notifications.size;
  if (!notifications.size) {
    list.replaceChildren(el("div", uid ? "No unread notification." : "Nothing yet.", "empty"));
    return;
  }
  list.replaceChildren(...newestFirst(notifications).map((n) => {
    const item = el("article", null, `item notification status-${n.status}`);
    item.dataset.docId = n.doc_id;
    if (n.doc_id === flash) item.classList.add("flash");
    const body = el("div", null, "body");
    const title = el("div", n.file_name, "title");
    body.append(title);
    body.append(el("div", joined(n.function_name, n.collection_name || n.collection_id), "line"));
    if (n.info_message) body.append(el("div", n.info_message));
    body.append(el("div", `${when(n.timestamp)} · ${n.doc_id}`, "line mono"));
    const side = el("div", null, "side");
    side.append(el("div", n.status, "status"));
    const button = el("button", reading.has(n.doc_id) ? "marking…" : "Mark read", "mark-read");
    button.type = "button";
    button.disabled = reading.has(n.doc_id);
    button.addEventListener("click", () => markRead(n.doc_id));
    side.append(button);
    item.append(body, side);
    return item;
  }));
}

function renderMessages(flash) {
  const list = $("messages");
  $("msg-count").textContent = messages.size;
  if (!messages.size) {
    list.replaceChildren(el("div", uid ? "No direct message." : "Nothing yet.", "empty"));
    return;
  }
  list.replaceChildren(...newestFirst(messages).map((m) => {
    const item = el("article", null, "item message");
    item.dataset.docId = m.doc_id;
    if (m.doc_id === flash) item.classList.add("flash");
    const body = el("div", null, "body");
    body.append(el("div", m.message, "title"));
    body.append(el("div", joined(m.file_name, m.status), "line"));
    const from = m.sender_id ? "from " + m.sender_id : "";
    body.append(el("div", joined(from, m.collection_name || m.collection_id, when(m.timestamp)), "line"));
    item.append(body);
    return item;
  }));
}

start();
