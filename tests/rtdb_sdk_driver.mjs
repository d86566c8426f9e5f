// The official Firebase JS SDK (@firebase/database, pinned in package-lock.json) driven from
// the tests: one JSON command a line on stdin, one JSON event a line on stdout.
//
//   node tests/rtdb_sdk_driver.mjs DATABASE_URL [TOKEN]
//
// DATABASE_URL is the stand-in's `http://127.0.0.1:PORT?ns=NAME` (a custom host: the SDK puts
// `ns` in the WebSocket URL; in Node it speaks WebSocket only). With TOKEN, a stand-in Firebase
// Auth (the `auth-internal` component the SDK asks for) hands the SDK that token, and the
// `token` command changes it the way Auth announces a refresh (the SDK then sends `auth` /
// `gauth` again on the open connection); a forced refresh (after the server revoked the token)
// gets whatever token is current.
//
// Commands: {"n", "op": listen {id, path, last?} | unlisten {id} | set {path, value} |
//   update {path, value} | remove {path} | token {token} | offline | online | exit}
// Events: {"ack": n, "error"?}, {"ev": "added"|"changed"|"removed", id, key, value},
//   {"ev": "value", id, value}, {"ev": "cancelled", id, error}, {"ev": "connected", value},
//   {"ev": "getToken", force}
import readline from 'node:readline';
import { initializeApp, _addComponent } from '@firebase/app';
import { Component } from '@firebase/component';
import {
  getDatabase, ref, query, orderByKey, limitToLast, onChildAdded, onChildChanged,
  onChildRemoved, onValue, set, update, remove, goOffline, goOnline, enableLogging
} from '@firebase/database';

const [url, token] = process.argv.slice(2);
const out = (message) => process.stdout.write(JSON.stringify(message) + '\n');
if (process.env.RTDB_SDK_LOG) enableLogging((line) => process.stderr.write(line + '\n'));

const app = initializeApp({ databaseURL: url, projectId: 'demo-sdk', apiKey: 'none', appId: '1:1:web:1' });
let current = token || null;
const tokenListeners = new Set();
if (current !== null) {
  const auth = {
    getToken: async (force) => {
      out({ ev: 'getToken', force: !!force });
      return current ? { accessToken: current } : null;
    },
    getUid: () => null,
    addAuthTokenListener: (listener) => tokenListeners.add(listener),
    removeAuthTokenListener: (listener) => tokenListeners.delete(listener)
  };
  _addComponent(app, new Component('auth-internal', () => auth, 'PRIVATE'));
}
const db = getDatabase(app);
onValue(ref(db, '.info/connected'), (snap) => out({ ev: 'connected', value: snap.val() }));

const listens = new Map();

function listen(id, path, last) {
  const target = last ? query(ref(db, path), orderByKey(), limitToLast(last)) : ref(db, path);
  const cancelled = (error) => out({ ev: 'cancelled', id, error: String(error) });
  const child = (ev) => (snap) => out({ ev, id, key: snap.key, value: snap.val() });
  listens.set(id, [
    onChildAdded(target, child('added'), cancelled),
    onChildChanged(target, child('changed'), cancelled),
    onChildRemoved(target, child('removed'), cancelled),
    onValue(target, (snap) => out({ ev: 'value', id, value: snap.val() }), cancelled)
  ]);
}

async function run(command) {
  switch (command.op) {
    case 'listen': return listen(command.id, command.path, command.last);
    case 'unlisten': for (const stop of listens.get(command.id) || []) stop(); listens.delete(command.id); return;
    case 'set': return set(ref(db, command.path), command.value);
    case 'update': return update(ref(db, command.path), command.value);
    case 'remove': return remove(ref(db, command.path));
    case 'token': current = command.token; for (const listener of tokenListeners) listener(current); return;
    case 'offline': return goOffline(db);
    case 'online': return goOnline(db);
    case 'exit': out({ ack: command.n }); process.exit(0);
    default: throw new Error(`unknown op ${command.op}`);
  }
}

const lines = readline.createInterface({ input: process.stdin });
lines.on('line', (line) => {
  const command = JSON.parse(line);
  Promise.resolve()
    .then(() => run(command))
    .then(() => out({ ack: command.n }), (error) => out({ ack: command.n, error: String(error) }));
});
lines.on('close', () => process.exit(0));
