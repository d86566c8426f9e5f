// ListenersClient's connection logic in Node, on a fake clock and a fake WebSocket: the ping
// and its bound, backoff, the browser's "online" and "visibilitychange" signals, final close
// codes, and a contract version it does not know. tests/test_js_client.py runs it
// (`node --test`); the same behaviours are shown end to end in Chromium by
// tests/test_browser_resilience.py. MODULE names the file under test (the served module).
import assert from "node:assert/strict";
import { test } from "node:test";

const { ListenersClient, ACCEPTED_VERSIONS } = await import(process.env.MODULE);

/** Timers and Date.now under the test's control: nothing runs until advance(). */
class Clock {
  constructor() {
    this.now = 1_700_000_000_000;
    this.timers = new Map();
    this.next = 1;
    this.saved = {};
  }
  install() {
    for (const name of ["setTimeout", "clearTimeout", "setInterval", "clearInterval"]) this.saved[name] = globalThis[name];
    this.saved.now = Date.now;
    globalThis.setTimeout = (fn, ms = 0) => this.add(fn, ms, 0);
    globalThis.setInterval = (fn, ms = 0) => this.add(fn, ms, Math.max(1, ms));
    globalThis.clearTimeout = globalThis.clearInterval = (id) => this.timers.delete(id);
    Date.now = () => this.now;
  }
  uninstall() {
    Object.assign(globalThis, { setTimeout: this.saved.setTimeout, clearTimeout: this.saved.clearTimeout });
    Object.assign(globalThis, { setInterval: this.saved.setInterval, clearInterval: this.saved.clearInterval });
    Date.now = this.saved.now;
  }
  add(fn, ms, every) {
    const id = this.next++;
    this.timers.set(id, { at: this.now + Math.max(0, ms), fn, every });
    return id;
  }
  pending() {
    return this.timers.size;
  }
  async advance(ms) {
    const end = this.now + ms;
    for (;;) {
      await settle();
      const due = [...this.timers.entries()].filter(([, t]) => t.at <= end).sort((a, b) => a[1].at - b[1].at)[0];
      if (!due) break;
      const [id, timer] = due;
      this.now = Math.max(this.now, timer.at);
      if (timer.every) timer.at += timer.every;
      else this.timers.delete(id);
      timer.fn();
    }
    this.now = end;
    await settle();
  }
}

// The client's connect awaits the token: let its promise chains run.
const settle = () => new Promise((resolve) => setImmediate(resolve));

/** A WebSocket the test drives: it records what the client sends and how it closed it. */
class FakeSocket {
  static made = [];
  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols;
    this.readyState = 0;
    this.sent = [];
    this.closedWith = null;
    FakeSocket.made.push(this);
  }
  open() {
    this.readyState = 1;
  }
  send(text) {
    this.sent.push(JSON.parse(text));
  }
  sentTypes() {
    return this.sent.map((m) => m.type);
  }
  deliver(message) {
    this.onmessage?.({ data: JSON.stringify(message) });
  }
  close(code, reason) {
    this.closedWith = { code, reason };
    this.readyState = 3;
  }
  serverClose(code, reason = "") {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }
}

/** The browser's signals: window's "online" / "offline", document's "visibilitychange". */
class Page {
  constructor() {
    this.window = new EventTarget();
    this.document = new EventTarget();
    this.document.visibilityState = "visible";
  }
  install() {
    globalThis.addEventListener = this.window.addEventListener.bind(this.window);
    globalThis.removeEventListener = this.window.removeEventListener.bind(this.window);
    globalThis.document = this.document;
  }
  uninstall() {
    delete globalThis.addEventListener;
    delete globalThis.removeEventListener;
    delete globalThis.document;
  }
  online() {
    this.window.dispatchEvent(new Event("online"));
  }
  show(state) {
    this.document.visibilityState = state;
    this.document.dispatchEvent(new Event("visibilitychange"));
  }
}

function sync(seq = 1, v = 1) {
  return {
    v, type: "notif.sync", uid: "u", timestamp: "", event_id: `sync-${seq}`, epoch: "e:1", seq,
    payload: { notifications: [{ doc_id: "n1" }], count: 1, timestamp: "" },
  };
}

/**
 * A started client on a fake clock; `live()` opens its current socket, says auth.ok and, as
 * the service does, sends the stream's sync (without one the client asks for a resync).
 */
async function harness(t, options = {}) {
  const clock = new Clock();
  const page = new Page();
  clock.install();
  page.install();
  FakeSocket.made = [];
  const statuses = [];
  const changes = [];
  const client = new ListenersClient({
    url: "ws://service/ws",
    token: async () => "token",
    WebSocketImpl: FakeSocket,
    onStatus: (status, detail) => statuses.push([status, detail]),
    onChange: (state, event) => changes.push(event.type),
    pingInterval: 30000,
    pongTimeout: 10000,
    ...options,
  });
  t.after(() => {
    client.stop();
    page.uninstall();
    clock.uninstall();
  });
  client.start();
  await settle();
  const socket = () => FakeSocket.made.at(-1);
  let seq = 0;
  const live = async (synced = true) => {
    socket().open();
    socket().deliver({ type: "auth.ok", uid: "u", expires_at: clock.now / 1000 + 3600 });
    if (synced) socket().deliver(sync(++seq));
    await settle();
  };
  return { clock, page, client, statuses, changes, socket, live };
}

test("pings on the interval; a pong, or any frame, keeps the socket", async (t) => {
  const { clock, socket, live } = await harness(t);
  await live();
  await clock.advance(29999);
  assert.deepEqual(socket().sentTypes(), []);
  await clock.advance(1);
  assert.deepEqual(socket().sentTypes(), ["ping"]);
  await clock.advance(5000);
  socket().deliver({ type: "pong" });
  await clock.advance(25000); // the next interval: a second ping
  assert.deepEqual(socket().sentTypes(), ["ping", "ping"]);
  await clock.advance(9000);
  socket().deliver(sync(2)); // an event before the pong: the server is alive, the bound moves
  await clock.advance(9000);
  assert.equal(FakeSocket.made.length, 1);
  assert.equal(socket().closedWith, null);
});

test("no pong within the bound: the socket is closed and another opened", async (t) => {
  const { clock, socket, live, statuses } = await harness(t, { backoff: { initial: 400, max: 400 } });
  await live();
  await clock.advance(30000);
  const first = socket();
  assert.deepEqual(first.sentTypes(), ["ping"]);
  await clock.advance(9999);
  assert.equal(first.closedWith, null);
  await clock.advance(1);
  assert.equal(first.closedWith.code, 4000);
  assert.match(first.closedWith.reason, /no pong/);
  assert.equal(statuses.at(-1)[0], "retrying");
  await clock.advance(400); // the backoff, at most 400 ms here
  assert.equal(FakeSocket.made.length, 2);
  first.deliver(sync()); // the dead socket's late frames do nothing
  first.serverClose(1006);
  await clock.advance(60000);
  assert.equal(FakeSocket.made.length, 2);
});

test("backoff grows with jitter up to its bound, and resets once live", async (t) => {
  const { clock, socket, statuses } = await harness(t, { backoff: { initial: 1000, max: 4000 } });
  const delays = [];
  for (let i = 0; i < 5; i++) {
    socket().serverClose(1006);
    await settle();
    delays.push(Number(/in ([\d.]+) s/.exec(statuses.at(-1)[1])[1]) * 1000);
    await clock.advance(4000);
  }
  const bounds = [1000, 2000, 4000, 4000, 4000];
  delays.forEach((delay, i) => assert.ok(delay >= bounds[i] / 2 - 50 && delay <= bounds[i] + 50, `${delays}`));
  assert.equal(FakeSocket.made.length, 6);
});

test("'online' reconnects at once, not after the backoff", async (t) => {
  const { clock, page, socket, live, statuses } = await harness(t, { backoff: { initial: 600000, max: 600000 } });
  await live();
  socket().serverClose(1006); // the network went away
  await settle();
  assert.equal(statuses.at(-1)[0], "retrying");
  await clock.advance(1000);
  assert.equal(FakeSocket.made.length, 1);
  page.online();
  await settle();
  assert.equal(FakeSocket.made.length, 2);
  await live();
  assert.equal(statuses.at(-1)[0], "live");
});

test("a tab shown again reconnects at once if its socket died while hidden", async (t) => {
  const { clock, page, socket, live } = await harness(t, { backoff: { initial: 600000, max: 600000 } });
  await live();
  page.show("hidden");
  socket().serverClose(1001); // an idle close while hidden
  await settle();
  await clock.advance(1000);
  page.show("hidden");
  assert.equal(FakeSocket.made.length, 1);
  page.show("visible");
  await settle();
  assert.equal(FakeSocket.made.length, 2);
});

test("a tab shown again with its socket open checks it with a ping", async (t) => {
  const { clock, page, socket, live } = await harness(t);
  await live();
  page.show("hidden");
  await clock.advance(1000);
  assert.deepEqual(socket().sentTypes(), []);
  page.show("visible");
  assert.deepEqual(socket().sentTypes(), ["ping"]);
  await clock.advance(10000); // no answer: dead, as after any unanswered ping
  assert.equal(FakeSocket.made[0].closedWith.code, 4000);
});

test("a final close code stops: no reconnect, even on 'online'", async (t) => {
  const { clock, page, socket, live, statuses } = await harness(t);
  await live();
  socket().serverClose(4012, "uid refused");
  await settle();
  assert.deepEqual(statuses.at(-1), ["closed", "closed 4012: uid refused"]);
  page.online();
  page.show("visible");
  await clock.advance(600000);
  assert.equal(FakeSocket.made.length, 1);
});

test("an unknown contract version: nothing applied, a warning, status 'incompatible', stopped", async (t) => {
  const { clock, page, socket, live, statuses, changes, client } = await harness(t);
  const warnings = [];
  const warn = console.warn;
  console.warn = (...args) => warnings.push(args.join(" "));
  t.after(() => (console.warn = warn));
  await live();
  assert.deepEqual(changes, ["notif.sync"]);
  const before = JSON.stringify(client.state);
  const next = ACCEPTED_VERSIONS.max + 1;
  socket().deliver({ ...sync(2, next), payload: { notifications: [], count: 0, timestamp: "" } });
  socket().deliver(sync(3)); // whatever follows on that socket is not applied either
  assert.deepEqual(changes, ["notif.sync"]);
  assert.equal(JSON.stringify(client.state), before);
  assert.equal(statuses.at(-1)[0], "incompatible");
  assert.match(statuses.at(-1)[1], new RegExp(`contract version ${next}; this client accepts 1 to 1`));
  assert.equal(warnings.length, 1);
  assert.match(warnings[0], /listeners-client: the service sends contract version/);
  assert.equal(socket().closedWith.code, 1000);
  page.online();
  await clock.advance(600000);
  assert.equal(FakeSocket.made.length, 1);
});

test("events without a version (an older service) are applied as version 1", async (t) => {
  const { socket, live, changes } = await harness(t);
  await live(false);
  const { v, ...unversioned } = sync(1);
  socket().deliver(unversioned);
  assert.deepEqual(changes, ["notif.sync"]);
});

test("stop() ends everything: no timer left, no listener", async (t) => {
  const { clock, page, client, live, statuses } = await harness(t);
  await live();
  client.stop();
  assert.equal(clock.pending(), 0);
  page.online();
  page.show("visible");
  await clock.advance(600000);
  assert.equal(FakeSocket.made.length, 1);
  assert.deepEqual(statuses.at(-1), ["closed", "stopped"]);
});
