// A typed use of the packed listeners-client, compiled with `tsc --noEmit` by
// tests/test_js_package.py against the tarball `npm pack` makes (installed as a dependency, so
// the package's `exports` and `types` are what resolve). Each @ts-expect-error proves that a
// type is precise: if it widened to `any`, the directive would be unused, and tsc would fail.
import {
  ACCEPTED_VERSIONS,
  EVENT_TYPES,
  ListenersClient,
  acceptsVersion,
  type ContractVersion,
  type ListenersEvent,
  type ListenersState,
  type ListenersStatus,
  type NotificationItem,
} from "listeners-client";

declare const firebaseUser: { getIdToken(forceRefresh?: boolean): Promise<string> };

function render(state: ListenersState): string {
  const first: NotificationItem | undefined = state.notifications[0];
  const unread: number = state.notifications.filter((n) => !n.read).length;
  const newest: string = state.newMessage?.file_name ?? "";
  const chat = Object.values(state.chats).flat().map((m) => m.id);
  // @ts-expect-error: a notification has no `sender_id` (a direct message may)
  state.notifications[0].sender_id;
  return `${first?.doc_id} ${unread} ${newest} ${chat.join()} ${state.count}`;
}

function describe(event: ListenersEvent): string {
  const version: ContractVersion = event.v;
  switch (event.type) {
    case "notif.sync":
      return `${version} ${event.payload.count} ${event.payload.notifications.map((n) => n.info_message)}`;
    case "notif.add":
    case "notif.update":
      return `${event.seq} ${event.payload.doc_id} ${event.payload.status}`;
    case "notif.remove":
    case "msg.remove":
      return event.payload.doc_id;
    case "msg.sync":
      return String(event.payload.new_message?.sender_id ?? event.payload.has_new_messages);
    case "chat.sync":
    case "chat.message":
      return `${event.payload.space_code}:${event.payload.thread_key} ${event.payload.raw_messages.length}`;
    case "notif.position":
    case "msg.position":
      // @ts-expect-error: a position's payload is empty
      return event.payload.doc_id;
    default:
      return `${event.epoch}:${event.seq}`;
  }
}

const shown: Record<ListenersStatus, string> = {
  connecting: "…",
  live: "live",
  retrying: "reconnecting",
  closed: "offline",
  incompatible: "please reload",
};

const client = new ListenersClient({
  url: "wss://listeners.example.com/ws",
  token: (fresh) => firebaseUser.getIdToken(fresh),
  onChange: (state, event) => console.log(render(state), describe(event)),
  onStatus: (status, detail) => console.log(shown[status], detail),
  onMessage: (message) => {
    if (message.type === "auth.ok") console.log(message.uid, new Date(message.expires_at * 1000));
  },
  pingInterval: 30_000,
  pongTimeout: 10_000,
  backoff: { initial: 500, max: 10_000 },
});
client.start();
client.send({ type: "notif.read", doc_id: "job-1" });
client.send({ type: "chat.subscribe", space_code: "acme", thread_key: "t1", mode: "job_chats" });
// @ts-expect-error: not a chat mode
client.send({ type: "chat.subscribe", space_code: "acme", thread_key: "t1", mode: "group" });
// @ts-expect-error: notif.read needs its doc_id
client.send({ type: "notif.read" });
// @ts-expect-error: not a status
const wrong: ListenersStatus = "open";
const known: readonly string[] = EVENT_TYPES;
console.log(known.length, ACCEPTED_VERSIONS.max, acceptsVersion({ v: 2 }), wrong);
void client.refresh();
client.wake("online");
client.stop();
