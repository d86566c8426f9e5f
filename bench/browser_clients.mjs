// The fault lab's browser consumer: the real listeners-client.js (the module the service
// serves at /assets/listeners-client.js, imported from its file, not re-implemented), one
// ListenersClient per user, all in this one Node process, connected through the services' /ws.
//
//   node --no-warnings bench/browser_clients.mjs CONFIG_JSON
//
// CONFIG_JSON: {"module": path of listeners-client.js, "urls": ["ws://127.0.0.1:P/ws", ...],
//               "token_url": "http://127.0.0.1:P/token", "uids": [...]}
//
// Tokens come from the local issuer's token endpoint (listeners_testkit/auth.py), fetched at
// every connect and refresh as a page would get them from Firebase Auth. Each new socket goes
// to the next URL in turn, as a load balancer sends it; like one with health checks, the
// lab tells this process which instances are alive ("urls" with each "state"), so a client
// whose instance died reconnects to another.
//
// Commands, one JSON line each on stdin, each answered with one JSON line on stdout:
//   {"cmd": "state", "urls": [...]} -> {"users": {uid: {"notif": {doc_id: status}, "msg": [doc_id],
//                        "synced": [family], "status": s}}, "seen": {"uid/doc_id": ms},
//                        "duplicates": n, "duplicate_examples": [...], "wire_duplicates": n,
//                        "connects": n, "events": n, "positions": n, "position_gaps": n,
//                        "position_gap_examples": [...], "positions_applied": n,
//                        "position_delays": [s]}
//     (positions: the tail position events received (`*.position`: where a stream stands after
//     it has been quiet, never a change), those the client's order rules found ahead of what
//     it held (a gap: its last events were lost), those handed to onChange (must be 0), and
//     for those received since the previous "state", the seconds since their stream's last event)
//     ("seen": items first seen since the previous "state", with Date.now() of the sighting)
//   {"cmd": "stop"}  -> {"stopped": n}, then the process exits.
// The WebSocket is the `ws` package's (package.json), which has the browsers' API. Node 20's
// own (undici's, behind --experimental-websocket) is not usable here: when a connection fails
// before the upgrade (a refused port, a reset) it fires `error` and never `close`, where
// browsers fire `close` (1006) after it; the client reconnects on `close`, so it would hang.

import { createInterface } from "node:readline";
import { pathToFileURL } from "node:url";
import WebSocket from "ws";

const config = JSON.parse(process.argv[2]);
const { ListenersClient, streamOf, EVENT_TYPES } = await import(pathToFileURL(config.module).href);

let next = 0;
let connects = 0;
let urls = config.urls;
class RoundRobinSocket extends WebSocket {
  constructor(_url, protocols) {
    super(urls[next++ % urls.length], protocols);
    connects += 1;
    // An 'error' nobody listens to is thrown by a Node EventEmitter; a browser just drops it
    // (the client does not set onerror: it acts on the `close` that follows).
    this.on("error", () => {});
  }
}

async function token(uid) {
  const response = await fetch(`${config.token_url}?uid=${encodeURIComponent(uid)}`);
  if (!response.ok) throw new Error(`token: HTTP ${response.status}`);
  return (await response.json()).token;
}

const users = new Map(); // uid -> {client, synced, applied, wire, status}
let fresh = {}; // "uid/doc_id" -> first sighting (ms), since the last "state"
const everSeen = new Set();
let duplicates = 0; // an event applied twice to the same state: twice since its stream's last sync
let reapplied = 0; // seen before a sync that replaced the state, and applied to that state again
let wireDuplicates = 0;
let events = 0;
const duplicateExamples = [];
let positions = 0;
let positionGaps = 0;
let positionsApplied = 0;
let positionDelays = []; // seconds from a stream's last event to its position, since the last "state"
const positionGapExamples = [];
const isPosition = (event) => String(event && event.type).endsWith(".position");

function sighting(uid, item) {
  if (!item || typeof item !== "object" || !("doc_id" in item)) return;
  const key = `${uid}/${item.doc_id}`;
  if (everSeen.has(key)) return;
  everSeen.add(key);
  fresh[key] = Date.now();
}

for (const uid of config.uids) {
  const user = {
    synced: new Set(),
    applied: new Map(),
    sinceSync: new Map(),
    wire: new Set(),
    lastEvent: new Map(), // stream -> Date.now() of its last event received
    status: "new",
    trail: [],
  };
  user.client = new ListenersClient({
    url: config.urls[0],
    token: () => token(uid),
    WebSocketImpl: RoundRobinSocket,
    onStatus: (status, detail) => {
      user.status = status;
      if (status !== "live") process.stderr.write(`${new Date().toISOString()} ${uid} ${status} ${detail}\n`);
    },
    onMessage: (message) => {
      // what the service sent, before the client's order rules: a re-delivery the client
      // drops is counted apart from one it applies
      const id = message && message.event_id;
      if (typeof id !== "string") return;
      if (isPosition(message)) {
        positions += 1; // its id is the same for the same position: never a re-delivery
        const last = user.lastEvent.get(streamOf(message));
        if (last !== undefined) positionDelays.push((Date.now() - last) / 1000);
        return;
      }
      if (EVENT_TYPES.includes(message.type)) user.lastEvent.set(streamOf(message), Date.now());
      if (user.wire.has(id) && !String(message.type).endsWith(".sync")) wireDuplicates += 1;
      user.wire.add(id);
    },
    onChange: (_state, event) => {
      if (isPosition(event)) {
        positionsApplied += 1; // never a change: neither delivered nor a duplicate
        return;
      }
      events += 1;
      const family = event.type.split(".")[0];
      const seen = `${event.type} ${event.epoch ?? ""}:${event.seq ?? ""} ${String(event.event_id).slice(0, 24)}`;
      if (!user.sinceSync.has(family)) user.sinceSync.set(family, new Set());
      const applied = user.sinceSync.get(family);
      if (event.type.endsWith(".sync")) {
        applied.clear();
        user.synced.add(family);
        for (const item of event.payload.notifications || event.payload.messages || []) sighting(uid, item);
      } else {
        if (user.applied.has(event.event_id) && !applied.has(event.event_id)) reapplied += 1;
        if (applied.has(event.event_id)) {
          duplicates += 1;
          if (duplicateExamples.length < 5) {
            duplicateExamples.push(
              `${uid}: ${seen} (first: ${user.applied.get(event.event_id)}; between: ${user.trail.slice(-6).join(" | ")})`,
            );
          }
        }
        sighting(uid, event.payload);
        applied.add(event.event_id);
      }
      if (!user.applied.has(event.event_id)) user.applied.set(event.event_id, seen);
      user.trail = [...user.trail.slice(-7), seen];
    },
  });
  // The order rules' verdict on each position: "gap" when it is ahead of what the client holds.
  const ordering = user.client.follower.ordering;
  const admit = ordering.admit.bind(ordering);
  ordering.admit = (event) => {
    if (!isPosition(event)) return admit(event);
    const held = ordering.positions.get(streamOf(event));
    const verdict = admit(event);
    if (verdict === "gap") {
      positionGaps += 1;
      if (positionGapExamples.length < 5) {
        const holding = held ? `${held.epoch}:${held.seq}` : "nothing";
        positionGapExamples.push(`${uid}: ${event.type} ${event.epoch}:${event.seq} while holding ${holding}`);
      }
    }
    return verdict;
  };
  users.set(uid, user);
}
for (const user of users.values()) user.client.start();

function state() {
  const out = {};
  for (const [uid, user] of users) {
    const s = user.client.state;
    const notif = {};
    for (const n of s.notifications) notif[n.doc_id] = String(n.status ?? "");
    out[uid] = { notif, msg: s.messages.map((m) => m.doc_id), synced: [...user.synced], status: user.status };
  }
  const seen = fresh;
  fresh = {};
  const delays = positionDelays;
  positionDelays = [];
  return {
    users: out,
    seen,
    duplicates,
    reapplied,
    duplicate_examples: duplicateExamples,
    wire_duplicates: wireDuplicates,
    connects,
    events,
    positions,
    position_gaps: positionGaps,
    position_gap_examples: positionGapExamples,
    positions_applied: positionsApplied,
    position_delays: delays,
  };
}

const lines = createInterface({ input: process.stdin });
lines.on("line", (line) => {
  const command = JSON.parse(line);
  if (command.cmd === "state") {
    if (Array.isArray(command.urls) && command.urls.length) urls = command.urls;
    process.stdout.write(JSON.stringify(state()) + "\n");
  } else if (command.cmd === "stop") {
    for (const user of users.values()) user.client.stop();
    process.stdout.write(JSON.stringify({ stopped: users.size }) + "\n", () => process.exit(0));
  }
});
lines.on("close", () => process.exit(0)); // the lab went away: so do the clients
