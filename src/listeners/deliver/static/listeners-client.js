// listeners-client.js — the browser side of Direct mode, as a small ES module.
//
// Served by the service at /assets/listeners-client.js (/demo uses it), and the very same file
// is the npm package clients/js (its build copies it byte for byte). No dependency, no build.
//
//   import { ListenersClient } from "/assets/listeners-client.js";
//   const client = new ListenersClient({
//     url: "wss://listeners.example.com/ws",
//     token: async (fresh) => firebaseUser.getIdToken(fresh),  // at each (re)connect and refresh
//     onChange: (state, event) => render(state),   // {notifications, messages, count, newMessage, hasNewMessages, chats}
//     onStatus: (status, detail) => show(status),  // "connecting" | "live" | "retrying" | "closed" | "incompatible"
//   });
//   client.start();            // client.stop() to end; client.send({type: "notif.read", doc_id})
//
// What it does (docs/websocket.md, docs/events.md "Order and gaps"; clients/js/README.md):
// - connects with the token in `Sec-WebSocket-Protocol: bearer, <token>`, and sends
//   `auth.refresh` with a fresh token a minute before the current one expires;
// - sends `{"type": "ping"}` every 30 s; a socket that then stays silent for 10 s is dead
//   (a half-open connection never closes by itself): it is dropped and another one opened;
// - reconnects with exponential backoff and jitter, except after a close code that a new
//   token cannot fix (FINAL_CODES); at once when the browser comes back online or the tab is
//   shown again (a hidden tab's timers are throttled, and its socket may have died meanwhile);
// - follows every stream's `epoch` and `seq` with the same rules as the Python bridge
//   (listeners_bridge/ordering.py): a missing seq, or an epoch without its sync, is a gap,
//   and the client sends `{"type": "resync"}`; events older than the last sync and
//   duplicates are dropped; a tail position (`*.position`) ahead of what it holds is a gap;
// - applies only events of a contract version it knows (ACCEPTED_VERSIONS): on another it
//   stops, warns on the console and reports the status "incompatible";
// - reduces the events to the UI's lists (`Reducers`, the same results as
//   listeners_bridge/reducers.py: a contract test runs both on the same events).

// The contract versions (every envelope's `v`, docs/events.md "Versions") this module can
// apply: majors, inclusive. listeners.events.ACCEPTED_VERSIONS is the Python consumer's.
export const ACCEPTED_VERSIONS = Object.freeze({ min: 1, max: 1 });

export const EVENT_TYPES = Object.freeze([
  "notif.sync", "notif.add", "notif.update", "notif.remove",
  "msg.sync", "msg.add", "msg.update", "msg.remove",
  "chat.sync", "chat.message",
  "notif.position", "msg.position", "chat.position",
]);
const SYNC_TYPES = new Set(["notif.sync", "msg.sync", "chat.sync"]);
const POSITION_TYPES = new Set(["notif.position", "msg.position", "chat.position"]);

// Close codes after which reconnecting with a fresh token would not help (docs/websocket.md).
export const FINAL_CODES = new Set([1008, 4002, 4003, 4004, 4005, 4006, 4007, 4009, 4010, 4012, 4013, 4016, 4017]);

/**
 * The contract version an event follows: its `v`; 1 when it has none (a service older than
 * the field, whose events are version 1); null when `v` is not an integer.
 */
export function eventVersion(event) {
  if (!Object.hasOwn(event, "v")) return 1;
  return Number.isInteger(event.v) ? event.v : null;
}

/** Whether this module can apply the event's contract version (listeners.events.check_version). */
export function acceptsVersion(event, accepted = ACCEPTED_VERSIONS) {
  const version = eventVersion(event);
  return version !== null && version >= accepted.min && version <= accepted.max;
}

/** The stream an event belongs to, which its `seq` counts. */
export function streamOf(event) {
  const family = String(event.type || "").split(".")[0];
  if (family === "chat") {
    const p = event.payload || {};
    return `chat:${p.space_code ?? ""}:${p.thread_key ?? ""}`;
  }
  return family;
}

/** The last `size` ids, to recognise re-deliveries without growing forever. */
class RecentIds {
  constructor(size) {
    this.size = size;
    this.ids = new Set();
  }
  has(id) {
    return this.ids.has(id);
  }
  add(id) {
    if (this.ids.has(id)) return false;
    this.ids.add(id);
    if (this.ids.size > this.size) this.ids.delete(this.ids.values().next().value);
    return true;
  }
}

/** The order rules of docs/events.md; "apply", "drop" or "gap" for each event. */
export class Ordering {
  constructor(recentIds = 4096) {
    this.positions = new Map(); // stream -> {epoch, seq, broken}
    this.applied = new RecentIds(recentIds);
    this.waitingStreams = new Set();
  }
  get waiting() {
    return this.waitingStreams.size > 0;
  }
  admit(event) {
    const { epoch, seq } = event;
    const id = String(event.event_id ?? "");
    if (typeof epoch !== "string" || !epoch || !Number.isInteger(seq)) {
      return this.applied.add(id) ? "apply" : "drop"; // a service older than issue 14
    }
    const stream = streamOf(event);
    const position = this.positions.get(stream);
    if (SYNC_TYPES.has(event.type)) {
      if (position && position.epoch === epoch && seq <= position.seq) return "drop";
      this.positions.set(stream, { epoch, seq, broken: false });
      this.waitingStreams.delete(stream);
      return "apply";
    }
    if (POSITION_TYPES.has(event.type)) return this.tail(stream, position, epoch, seq);
    if (!position) {
      this.waitingStreams.add(stream);
      return "gap";
    }
    if (position.epoch !== epoch) return this.applied.has(id) ? "drop" : "gap";
    if (seq <= position.seq || position.broken) return "drop";
    if (seq !== position.seq + 1) {
      position.broken = true;
      this.waitingStreams.add(stream);
      return "gap";
    }
    position.seq = seq;
    this.applied.add(id);
    return "apply";
  }
  // Where a stream ended: never applied; ahead of what is held, the last events were missed.
  tail(stream, position, epoch, seq) {
    if (!position || position.broken) return "drop"; // waiting for a sync already
    if (position.epoch !== epoch) {
      this.waitingStreams.add(stream);
      return "gap";
    }
    if (seq <= position.seq) return "drop";
    position.broken = true;
    this.waitingStreams.add(stream);
    return "gap";
  }
}

/** A consumer's side of convergence: the rules, and whether it must ask for a resync. */
export class Follower {
  constructor(recentIds = 4096) {
    this.ordering = new Ordering(recentIds);
    this.synced = false;
  }
  get needsResync() {
    return !this.synced || this.ordering.waiting;
  }
  lost() {
    this.synced = false;
  }
  admit(event) {
    const verdict = this.ordering.admit(event);
    if (verdict === "gap") {
      this.synced = false;
      return false;
    }
    if (verdict === "drop") return false;
    if (SYNC_TYPES.has(event.type)) this.synced = true;
    return true;
  }
}

function newestFirst(map) {
  // listeners.normalise.notifications.newest_first: newest first by `timestamp` (normalised
  // ISO text in UTC, so text order is time order), "" last, ties by `doc_id`, highest first.
  const desc = (x, y) => (x < y ? 1 : x > y ? -1 : 0);
  return [...map.values()].sort((a, b) => {
    const x = a.timestamp || "", y = b.timestamp || "";
    if (!x || !y) return x ? -1 : y ? 1 : desc(String(a.doc_id ?? ""), String(b.doc_id ?? ""));
    return desc(x, y) || desc(String(a.doc_id ?? ""), String(b.doc_id ?? ""));
  });
}

/** Events -> the UI's lists, as listeners_bridge/reducers.py does. */
export class Reducers {
  constructor() {
    this.notificationItems = new Map();
    this.messageItems = new Map();
    this.newMessage = null;
    this.hasNewMessages = false;
    this.threads = new Map(); // "space_code:thread_key" -> Map(id -> message), in order
  }

  apply(event) {
    const kind = event.type, p = event.payload || {};
    switch (kind) {
      case "notif.sync":
        this.notificationItems = new Map((p.notifications || []).filter((n) => "doc_id" in n).map((n) => [n.doc_id, n]));
        break;
      case "notif.add":
      case "notif.update":
        if ("doc_id" in p) this.notificationItems.set(p.doc_id, p);
        break;
      case "notif.remove":
        this.notificationItems.delete(p.doc_id ?? "");
        break;
      case "msg.sync":
        this.messageItems = new Map((p.messages || []).filter((m) => "doc_id" in m).map((m) => [m.doc_id, m]));
        this.newMessage = p.new_message ?? null;
        this.hasNewMessages = Boolean(p.has_new_messages ?? this.messageItems.size > 0);
        break;
      case "msg.add":
        if ("doc_id" in p) {
          this.messageItems.set(p.doc_id, p);
          this.newMessage = p;
          this.hasNewMessages = true;
        }
        break;
      case "msg.update":
        if ("doc_id" in p) this.messageItems.set(p.doc_id, p);
        break;
      case "msg.remove":
        this.messageItems.delete(p.doc_id ?? "");
        if (this.newMessage && this.newMessage.doc_id === p.doc_id) this.newMessage = null;
        this.hasNewMessages = this.messageItems.size > 0;
        break;
      case "chat.sync":
      case "chat.message": {
        const key = `${p.space_code ?? ""}:${p.thread_key ?? ""}`;
        const thread = this.threads.get(key) || new Map();
        for (const m of p.raw_messages || []) {
          if (m && typeof m === "object" && "id" in m) {
            // a sync brings the recent unread messages: it refreshes them; a message adds once
            if (kind === "chat.sync" || !thread.has(m.id)) thread.set(m.id, m);
          }
        }
        this.threads.set(key, thread);
        break;
      }
      default:
        return false;
    }
    return true;
  }

  get state() {
    const messages = newestFirst(this.messageItems);
    const chats = {};
    for (const [key, thread] of this.threads) chats[key] = [...thread.values()];
    return {
      notifications: newestFirst(this.notificationItems),
      messages,
      count: messages.length,
      newMessage: this.newMessage,
      hasNewMessages: this.hasNewMessages,
      chats,
    };
  }
}

/** One user's live connection: token, refresh, liveness, reconnects, gaps and reducers. */
export class ListenersClient {
  constructor({
    url,
    token,
    onChange = () => {},
    onStatus = () => {},
    onMessage = () => {},
    WebSocketImpl = globalThis.WebSocket,
    pingInterval = 30000, // ms between pings (docs/websocket.md: "every 30 s or so")
    pongTimeout = 10000, // ms of silence after a ping that make the socket dead
    backoff = { initial: 500, max: 10000 }, // ms; each delay is scaled by a jitter of 0.5 to 1
  }) {
    this.url = url;
    this.token = token;
    this.onChange = onChange;
    this.onStatus = onStatus;
    this.onMessage = onMessage;
    this.WebSocketImpl = WebSocketImpl;
    this.pingInterval = pingInterval;
    this.pongTimeout = pongTimeout;
    this.backoff = { initial: 500, max: 10000, ...backoff };
    this.reducers = new Reducers();
    this.follower = new Follower();
    this.socket = null;
    this.retries = 0;
    this.running = false;
    this.refreshTimer = null;
    this.retryTimer = null;
    this.resyncTimer = null;
    this.pingTimer = null;
    this.pongTimer = null;
    this.heardAt = 0; // when the socket last sent anything
    this.generation = 0; // callbacks of an older socket, or of an older retry, do nothing
    // The browser's own signals. "online": the network is back, so a reconnect waiting for its
    // backoff goes now. "offline" and a tab shown again: the socket may be dead without a
    // close event (a hidden tab's timers are throttled, a laptop slept): check it at once.
    this._onOnline = () => this.wake("online");
    this._onOffline = () => this._probe();
    this._onVisibility = () => {
      if (globalThis.document?.visibilityState === "visible") this.wake("visible");
    };
  }

  start() {
    if (this.running) return;
    this.running = true;
    globalThis.addEventListener?.("online", this._onOnline);
    globalThis.addEventListener?.("offline", this._onOffline);
    globalThis.document?.addEventListener("visibilitychange", this._onVisibility);
    this._connect();
  }

  stop() {
    this._halt();
    this.onStatus("closed", "stopped");
  }

  /** Send a client message (notif.read, chat.subscribe, ping…); false when not connected. */
  send(message) {
    if (!this.socket || this.socket.readyState !== 1) return false;
    this.socket.send(JSON.stringify(message));
    return true;
  }

  get state() {
    return this.reducers.state;
  }

  /**
   * Reconnect now if no socket is open (a retry waiting for its backoff goes at once, with
   * the backoff reset), or check that the open one is alive; called on "online" and when the
   * tab is shown again.
   */
  wake(why = "wake") {
    if (!this.running) return;
    if (this.socket) {
      this._probe();
      return;
    }
    if (this.retryTimer === null) return; // a connection is being made already
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    this.retries = 0;
    this.onStatus("retrying", `${why}: reconnecting now`);
    this._connect();
  }

  // Stops everything: timers, listeners, the socket; no callback of it runs after this.
  _halt(code = 1000, reason = "client stopped") {
    this.running = false;
    this.generation += 1;
    this._clearTimers();
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    globalThis.removeEventListener?.("online", this._onOnline);
    globalThis.removeEventListener?.("offline", this._onOffline);
    globalThis.document?.removeEventListener("visibilitychange", this._onVisibility);
    if (this.socket) this.socket.close(code, reason);
    this.socket = null;
  }

  _clearTimers() {
    for (const timer of ["refreshTimer", "resyncTimer", "pongTimer"]) {
      clearTimeout(this[timer]);
      this[timer] = null;
    }
    clearInterval(this.pingTimer);
    this.pingTimer = null;
  }

  async _connect() {
    this.retryTimer = null;
    const mine = ++this.generation;
    this.onStatus("connecting", "");
    let token;
    try {
      token = await this.token();
    } catch (error) {
      if (mine === this.generation) this._retry("no token");
      return;
    }
    if (mine !== this.generation || !this.running) return;
    const ws = new this.WebSocketImpl(this.url, ["bearer", token]);
    this.socket = ws;
    ws.onmessage = (event) => {
      if (mine !== this.generation) return;
      this.heardAt = Date.now();
      let message;
      try {
        message = JSON.parse(event.data);
      } catch (error) {
        return; // not JSON: nothing the service sends
      }
      if (message && typeof message === "object") this._handle(message, mine);
    };
    ws.onclose = (event) => {
      if (mine !== this.generation) return;
      this._lost(`closed ${event.code}`, event.code, event.reason);
    };
  }

  // The socket is gone (closed, or found dead): whatever was published meanwhile is lost,
  // so the next socket starts with fresh syncs (the service sends them after auth.ok).
  _lost(why, code = 1006, reason = "") {
    this.generation += 1; // the old socket's late callbacks are ignored
    const socket = this.socket;
    this.socket = null;
    this._clearTimers();
    this.follower.lost();
    if (socket && socket.readyState < 2) socket.close(4000, why.slice(0, 100)); // found dead
    if (FINAL_CODES.has(code)) {
      this._halt();
      this.onStatus("closed", `closed ${code}: ${reason || "refused"}`);
      return;
    }
    this._retry(why);
  }

  _retry(why) {
    if (!this.running) return;
    const mine = ++this.generation;
    const { initial, max } = this.backoff;
    const delay = Math.min(max, initial * 2 ** this.retries) * (0.5 + Math.random() / 2);
    this.retries += 1;
    this.onStatus("retrying", `${why}; reconnecting in ${Math.round(delay / 100) / 10} s`);
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => mine === this.generation && this.running && this._connect(), delay);
  }

  // A ping, unless one is unanswered already. The socket is dead once it has said nothing at
  // all for pongTimeout since the ping: a frame meanwhile proves the server alive (its pong may
  // be queued behind events) and moves the bound; the pong ends the check.
  _probe() {
    if (!this.socket || this.pongTimer !== null) return;
    if (!this.send({ type: "ping" })) return; // still opening: its own close will tell
    const mine = this.generation;
    const sent = Date.now();
    const check = () => {
      if (mine !== this.generation) return;
      const silent = Date.now() - Math.max(sent, this.heardAt);
      if (silent < this.pongTimeout) {
        this.pongTimer = setTimeout(check, this.pongTimeout - silent);
        return;
      }
      this.pongTimer = null;
      this._lost(`no pong within ${this.pongTimeout / 1000} s`);
    };
    this.pongTimer = setTimeout(check, this.pongTimeout);
  }

  _scheduleRefresh(expiresAt, mine) {
    clearTimeout(this.refreshTimer);
    const delay = Math.max(5, expiresAt - Date.now() / 1000 - 60) * 1000;
    this.refreshTimer = setTimeout(() => this.refresh(mine), delay);
  }

  /** Sends `auth.refresh` with a fresh token now (also called by the schedule). */
  async refresh(mine = this.generation) {
    if (mine !== this.generation || !this.socket) return;
    try {
      const token = await this.token(true);
      this.send({ type: "auth.refresh", token });
    } catch (error) {
      this._scheduleRefresh(Date.now() / 1000 + 70, mine); // try again in ten seconds
    }
  }

  _askResync(mine) {
    // The service answers with syncs; ask again every 5 s while a gap is not healed.
    clearTimeout(this.resyncTimer);
    if (mine !== this.generation || !this.follower.needsResync) return;
    this.send({ type: "resync" });
    this.resyncTimer = setTimeout(() => this._askResync(mine), 5000);
  }

  // A service whose events this module cannot apply: applying them could show wrong lists,
  // and reconnecting would meet the same service. Say so, and stop.
  _incompatible(message) {
    const { min, max } = ACCEPTED_VERSIONS;
    const detail =
      `the service sends contract version ${JSON.stringify(message.v)}; this client accepts ` +
      `${min} to ${max}: load a client that matches the service`;
    console.warn(`listeners-client: ${detail}`);
    this._halt(1000, "unsupported contract version");
    this.onStatus("incompatible", detail);
  }

  _handle(message, mine) {
    // Every envelope carries `v`; answers to client messages (auth.ok, pong…) carry none.
    const envelope = Object.hasOwn(message, "v") || EVENT_TYPES.includes(message.type);
    if (envelope && !acceptsVersion(message)) {
      this._incompatible(message);
      return;
    }
    this.onMessage(message);
    if (message.type === "pong") {
      clearTimeout(this.pongTimer);
      this.pongTimer = null;
      return;
    }
    if (message.type === "auth.ok") {
      this.retries = 0;
      this.onStatus("live", message.uid);
      this._scheduleRefresh(message.expires_at, mine);
      clearInterval(this.pingTimer);
      this.pingTimer = setInterval(() => this._probe(), this.pingInterval);
      // The service sends fresh syncs after auth.ok by itself; should one of them not come,
      // ask in 5 s (and every 5 s) until every stream is synced, as the bridge does.
      clearTimeout(this.resyncTimer);
      this.resyncTimer = setTimeout(() => this._askResync(mine), 5000);
      return;
    }
    if (!EVENT_TYPES.includes(message.type)) return;
    const asking = this.follower.needsResync;
    if (this.follower.admit(message)) {
      this.reducers.apply(message);
      this.onChange(this.state, message);
    } else if (this.follower.needsResync && !asking) {
      this._askResync(mine);
    }
  }
}
