// listeners-client.js — the browser side of Direct mode, as a small ES module.
//
// Served by the service at /assets/listeners-client.js; /demo uses it. No dependency, no build.
//
//   import { ListenersClient } from "/assets/listeners-client.js";
//   const client = new ListenersClient({
//     url: "wss://listeners.example.com/ws",
//     token: async () => (await firebaseUser.getIdToken()),    // called at each (re)connect and refresh
//     onChange: (state) => render(state),                        // {notifications, messages, newMessage, hasNewMessages, chats}
//     onStatus: (status, detail) => showConnection(status, detail), // "connecting" | "live" | "retrying" | "closed"
//   });
//   client.start();            // client.stop() to end; client.send({type: "notif.read", doc_id})
//
// What it does (docs/websocket.md, docs/events.md "Order and gaps"):
// - connects with the token in `Sec-WebSocket-Protocol: bearer, <token>`, and sends
//   `auth.refresh` with a fresh token a minute before the current one expires;
// - reconnects with exponential backoff and jitter, except after a close code that a new
//   token cannot fix (FINAL_CODES);
// - follows every stream's `epoch` and `seq` with the same rules as the Python bridge
//   (listeners/bridge/ordering.py): a missing seq, or an epoch without its sync, is a gap,
//   and the client sends `{"type": "resync"}`; events older than the last sync and
//   duplicates are dropped; a tail position (`*.position`) ahead of what it holds is a gap;
// - reduces the events to the UI's lists (`Reducers`, the same results as
//   listeners/bridge/reducers.py: a contract test runs both on the same events).

export const EVENT_TYPES = Object.freeze([
  "notif.sync", "notif.add", "notif.update", "notif.remove",
  "msg.sync", "msg.add", "msg.update", "msg.remove",
  "chat.sync", "chat.message",
  "notif.position", "msg.position", "chat.position",
]);
const SYNC_TYPES = new Set(["notif.sync", "msg.sync", "chat.sync"]);
const POSITION_TYPES = new Set(["notif.position", "msg.position", "chat.position"]);

// Close codes after which reconnecting with a fresh token would not help (docs/websocket.md).
export const FINAL_CODES = new Set([1008, 4002, 4003, 4004, 4005, 4006, 4007, 4009, 4010, 4013, 4016, 4017]);

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

/** Events -> the UI's lists, as listeners/bridge/reducers.py does. */
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

/** One user's live connection: token, refresh, reconnects, gaps and reducers. */
export class ListenersClient {
  constructor({ url, token, onChange = () => {}, onStatus = () => {}, onMessage = () => {}, WebSocketImpl = globalThis.WebSocket }) {
    this.url = url;
    this.token = token;
    this.onChange = onChange;
    this.onStatus = onStatus;
    this.onMessage = onMessage;
    this.WebSocketImpl = WebSocketImpl;
    this.reducers = new Reducers();
    this.follower = new Follower();
    this.socket = null;
    this.retries = 0;
    this.running = false;
    this.refreshTimer = null;
    this.retryTimer = null;
    this.resyncTimer = null;
    this.generation = 0; // callbacks of an older socket do nothing
  }

  start() {
    if (this.running) return;
    this.running = true;
    this._connect();
  }

  stop() {
    this.running = false;
    this.generation += 1;
    clearTimeout(this.refreshTimer);
    clearTimeout(this.retryTimer);
    clearTimeout(this.resyncTimer);
    if (this.socket) this.socket.close(1000, "client stopped");
    this.socket = null;
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

  async _connect() {
    const mine = ++this.generation;
    this.onStatus("connecting", "");
    let token;
    try {
      token = await this.token();
    } catch (error) {
      return this._retry(mine, "no token");
    }
    if (mine !== this.generation || !this.running) return;
    const ws = new this.WebSocketImpl(this.url, ["bearer", token]);
    this.socket = ws;
    ws.onmessage = (event) => {
      if (mine === this.generation) this._handle(JSON.parse(event.data), mine);
    };
    ws.onclose = (event) => {
      if (mine !== this.generation) return;
      this.socket = null;
      clearTimeout(this.refreshTimer);
      this.follower.lost(); // whatever was published while away is lost: resync on return
      if (FINAL_CODES.has(event.code)) {
        this.running = false;
        this.onStatus("closed", `closed ${event.code}: ${event.reason || "refused"}`);
      } else {
        this._retry(mine, `closed ${event.code}`);
      }
    };
  }

  _retry(mine, why) {
    if (mine !== this.generation || !this.running) return;
    const delay = Math.min(10000, 500 * 2 ** this.retries) * (0.5 + Math.random() / 2);
    this.retries += 1;
    this.onStatus("retrying", `${why}; reconnecting in ${Math.round(delay / 100) / 10} s`);
    this.retryTimer = setTimeout(() => mine === this.generation && this._connect(), delay);
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

  _handle(message, mine) {
    this.onMessage(message);
    if (message.type === "auth.ok") {
      this.retries = 0;
      this.onStatus("live", message.uid);
      this._scheduleRefresh(message.expires_at, mine);
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
