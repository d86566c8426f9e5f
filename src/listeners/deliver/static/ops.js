// The operations page: polls /ops/state with the admin token (sessionStorage, header only)
// and shows the instance, its dependencies, its users and streams, event rates and the
// last events. Everything is written with textContent: no data becomes markup.
"use strict";

const POLL_MS = 2000;
const KEY = "listeners.adminToken";
const $ = (id) => document.getElementById(id);
let previous = null; // the last state, for rates
let timer = null;

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const [text, className] of cells) tr.append(el("td", text, className));
  return tr;
}

function plural(count, noun) {
  return `${count} ${noun}${count === 1 ? "" : "s"}`;
}

function pill(node, text, kind) {
  node.textContent = text;
  node.className = "pill " + kind;
}

function showSignin(message) {
  clearTimeout(timer);
  $("dashboard").classList.add("hidden");
  $("signout").classList.add("hidden");
  $("signin").classList.remove("hidden");
  $("signin-error").textContent = message || "";
  $("token").focus();
}

function showDashboard() {
  $("signin").classList.add("hidden");
  $("dashboard").classList.remove("hidden");
  $("signout").classList.remove("hidden");
}

async function poll() {
  const token = sessionStorage.getItem(KEY);
  if (!token) return showSignin("");
  let response;
  try {
    response = await fetch("/ops/state", { headers: { Authorization: "Bearer " + token }, cache: "no-store" });
  } catch (error) {
    pill($("status"), "unreachable", "bad");
    timer = setTimeout(poll, POLL_MS);
    return;
  }
  if (response.status === 401) {
    sessionStorage.removeItem(KEY);
    return showSignin("That token was refused.");
  }
  if (response.ok) {
    render(await response.json());
    showDashboard();
  } else {
    pill($("status"), "HTTP " + response.status, "warn");
  }
  timer = setTimeout(poll, POLL_MS);
}

function render(state) {
  $("instance").textContent = state.instance_id;
  $("version").textContent = state.version;
  pill($("status"), state.status, state.status === "ok" ? "ok" : "warn");
  $("updated").textContent = "updated " + new Date(state.time * 1000).toLocaleTimeString();

  pill($("redis"), state.redis, state.redis === "up" ? "ok" : "bad");
  $("publish").textContent = `queue ${state.publish.queued} · not published ${state.publish.failures}`;
  pill($("registry"), state.registry, state.registry === "up" ? "ok" : "bad");
  $("users").textContent = state.users.count;
  const s = state.streams;
  $("streams").textContent = s.attached;
  $("streams-sub").textContent =
    `open: Firestore ${s.firestore_open}, RTDB ${s.rtdb_open} · failed ${s.failed} · restarts ${s.restarts}`;
  if (state.websocket) {
    $("sockets").textContent = state.websocket.sockets;
    $("sockets-sub").textContent =
      `${plural(state.websocket.users, "user")} · hub ${state.websocket.hub_connected ? "connected" : "down"}, ` +
      plural(state.websocket.hub_channels, "channel");
  } else {
    $("sockets").textContent = "off";
  }

  const seconds = previous ? state.time - previous.time : 0;
  const rates = {};
  let total = 0;
  for (const [type, count] of Object.entries(state.events)) {
    const before = previous && previous.events[type] !== undefined ? previous.events[type] : count;
    rates[type] = seconds > 0 ? Math.max(0, count - before) / seconds : 0;
    total += rates[type];
  }
  $("rate").textContent = previous ? total.toFixed(1) : "…";

  const events = $("events");
  events.replaceChildren();
  const types = Object.keys(state.events).sort();
  if (!types.length) events.append(row([["no events yet", "muted"], ["", ""], ["", ""]]));
  for (const type of types) {
    events.append(row([[type, "mono"], [state.events[type], "num"], [rates[type].toFixed(1), "num"]]));
  }

  const recent = $("recent");
  recent.replaceChildren();
  if (!state.recent.length) recent.append(row([["no events yet", "muted"], ["", ""], ["", ""], ["", ""]]));
  for (const e of state.recent) {
    recent.append(row([
      [new Date(e.at * 1000).toLocaleTimeString(), "mono"],
      [e.uid, "mono"],
      [e.type, "mono"],
      [e.doc_id || "—", "mono"],
    ]));
  }

  $("users-count").textContent = state.users.count;
  const uids = $("uids");
  uids.replaceChildren(...state.users.uids.map((uid) => el("span", uid, "chip mono")));
  if (state.users.truncated) uids.append(el("span", `+${state.users.count - state.users.uids.length} more`, "muted"));
  if (!state.users.count) uids.append(el("span", "nobody online", "muted"));
  previous = state;
}

$("signin-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const token = $("token").value.trim();
  if (!token) return;
  sessionStorage.setItem(KEY, token);
  $("token").value = "";
  previous = null;
  poll();
});
$("signout").addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  previous = null;
  showSignin("");
});
poll();
