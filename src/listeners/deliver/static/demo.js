// The demo page: pick a demo user, get a token from the local issuer (LISTENERS_DEMO_TOKEN_URL)
// and follow the user's notifications and direct messages through the browser client module
// (/assets/listeners-client.js: token refresh, reconnects, gap detection and resync, reducers).
// "Mark read" sends notif.read, which writes read: true in Firestore; the notif.remove that
// follows takes the item away. "Refresh token" sends auth.refresh with a fresh token now.
// Everything is written with textContent: no data becomes markup.
import { ListenersClient } from "/assets/listeners-client.js";

const $ = (id) => document.getElementById(id);
const LOG_ROWS = 40;

let config = null;
let uid = null;
let client = null;
let state = { notifications: [], messages: [] };
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
  $("refresh").addEventListener("click", () => client && client.refresh());
  const wanted = decodeURIComponent(location.hash.slice(1));
  if (users.includes(wanted)) signIn(wanted);
}

function signIn(user) {
  if (client) client.stop();
  uid = user;
  state = { notifications: [], messages: [] };
  reading.clear();
  renderNotifications();
  renderMessages();
  $("log").replaceChildren();
  history.replaceState(null, "", "#" + encodeURIComponent(user));
  for (const button of $("users").children) button.classList.toggle("active", button.dataset.uid === user);
  $("who").textContent = "";
  $("hint").classList.add("hidden");
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  client = new ListenersClient({
    url: `${scheme}//${location.host}${config.ws_path}`,
    token: async () => (await fetchToken(user)).token,
    onStatus: (status, detail) => {
      const kinds = { live: "ok", connecting: "warn", retrying: "warn", closed: "bad", incompatible: "bad" };
      setConnection(status === "live" ? "live" : detail || status, kinds[status] || "warn");
    },
    onChange: (next, event) => {
      const flash = event.payload && event.payload.doc_id;
      if (event.type === "notif.remove") reading.delete(event.payload.doc_id);
      state = next;
      if (event.type.startsWith("notif.")) renderNotifications(flash);
      if (event.type.startsWith("msg.")) renderMessages(flash);
    },
    onMessage: (message) => {
      if (message.type === "auth.ok") {
        $("who").textContent = `${message.uid} · token until ${new Date(message.expires_at * 1000).toLocaleTimeString()}`;
      } else if (message.type === "notif.read.failed") {
        reading.delete(message.doc_id);
        renderNotifications();
      }
      log(message);
    },
  });
  client.start();
}

function log(message) {
  const p = message.payload || {};
  let detail = p.doc_id || message.doc_id || "";
  if (message.type === "notif.sync" || message.type === "msg.sync") {
    detail = `${p.count} item${p.count === 1 ? "" : "s"}`;
  }
  const seq = message.seq === undefined ? "" : String(message.seq);
  const tr = document.createElement("tr");
  tr.append(
    el("td", new Date().toLocaleTimeString(), "mono"),
    el("td", message.type, "mono"),
    el("td", seq, "mono"),
    el("td", detail, "mono"),
  );
  const body = $("log");
  body.prepend(tr);
  while (body.children.length > LOG_ROWS) body.lastChild.remove();
}

function markRead(docId) {
  if (!client || reading.has(docId)) return;
  if (client.send({ type: "notif.read", doc_id: docId })) reading.add(docId);
  renderNotifications();
}

function renderNotifications(flash) {
  const list = $("notifications");
  const items = state.notifications;
  $("notif-count").textContent = items.length;
  if (!items.length) {
    list.replaceChildren(el("div", uid ? "No unread notification." : "Nothing yet.", "empty"));
    return;
  }
  list.replaceChildren(...items.map((n) => {
    const item = el("article", null, `item notification status-${n.status}`);
    item.dataset.docId = n.doc_id;
    if (n.doc_id === flash) item.classList.add("flash");
    const body = el("div", null, "body");
    body.append(el("div", n.file_name, "title"));
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
  const items = state.messages;
  $("msg-count").textContent = items.length;
  if (!items.length) {
    list.replaceChildren(el("div", uid ? "No direct message." : "Nothing yet.", "empty"));
    return;
  }
  list.replaceChildren(...items.map((m) => {
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
