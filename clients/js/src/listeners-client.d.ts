// The API of listeners-client.js (the service's /assets/listeners-client.js), written by hand
// over the event types that build.mjs generates from docs/schemas into events.d.ts.
// tests/test_js_package.py checks that every value declared here is exported by the module and
// the other way round, and compiles a typed usage example against the packed tarball.
import type {
  ListenersEvent,
  MessageItem,
  NotificationItem,
} from "./events.js";

export type * from "./events.js";

/** Every event type of the contract, as the module knows them. */
export declare const EVENT_TYPES: readonly ListenersEvent["type"][];

/** The contract versions (an event's `v`) this module applies: majors, inclusive. */
export declare const ACCEPTED_VERSIONS: Readonly<{ min: number; max: number }>;

/** Close codes after which the client does not reconnect: a new token would not help. */
export declare const FINAL_CODES: ReadonlySet<number>;

/** The version an event follows: its `v`, 1 without one (an older service), null if not an integer. */
export declare function eventVersion(event: object): number | null;

/** Whether the event's version is within `accepted` (by default ACCEPTED_VERSIONS). */
export declare function acceptsVersion(
  event: object,
  accepted?: Readonly<{ min: number; max: number }>,
): boolean;

/** The stream whose `seq` an event counts: "notif", "msg" or "chat:{space_code}:{thread_key}". */
export declare function streamOf(event: Pick<ListenersEvent, "type" | "payload">): string;

/** One raw chat message: the node's fields as they are, its push id as `id`. */
export interface ChatMessage {
  id: string;
  [field: string]: unknown;
}

/** The UI's lists, as the bridge's reducers make them. */
export interface ListenersState {
  /** Newest first: `timestamp` descending, items without one last, ties by `doc_id`. */
  notifications: NotificationItem[];
  messages: MessageItem[];
  count: number;
  newMessage: MessageItem | null;
  hasNewMessages: boolean;
  /** "space_code:thread_key" -> that thread's messages, in order. */
  chats: Record<string, ChatMessage[]>;
}

/**
 * - `connecting`: a token is being fetched or the socket opened
 * - `live`: authenticated (`detail` is the uid)
 * - `retrying`: the socket closed or was found dead; `detail` says why and when it retries
 * - `closed`: stopped, or closed with a code a new token cannot fix (FINAL_CODES)
 * - `incompatible`: the service sends a contract version this client does not accept; stopped
 */
export type ListenersStatus = "connecting" | "live" | "retrying" | "closed" | "incompatible";

/** Answers to client messages (docs/websocket.md, "Client messages"). */
export type ServerReply =
  | { type: "auth.ok"; uid: string; expires_at: number }
  | { type: "auth.refused"; reason: string; code: number }
  | { type: "pong" }
  | { type: "error"; reason: string }
  | { type: "notif.read.ok"; doc_id: string }
  | { type: "notif.read.failed"; doc_id: string }
  | { type: "chat.subscribed" | "chat.unsubscribed"; space_code: string; thread_key: string; mode: ChatMode }
  | { type: "chat.refused"; reason: string; space_code: string; thread_key: string; mode: ChatMode };

export type ChatMode = "chats" | "job_chats" | "active_chats";

/** Messages a client may send (docs/websocket.md, "Client messages"). */
export type ClientMessage =
  | { type: "ping" }
  | { type: "resync" }
  | { type: "auth.refresh"; token: string }
  | { type: "notif.read"; doc_id: string }
  | { type: "chat.subscribe" | "chat.unsubscribe"; space_code: string; thread_key: string; mode: ChatMode };

export interface ListenersClientOptions {
  /** wss://host/ws */
  url: string;
  /** A Firebase ID token; `fresh` is true for a refresh (getIdToken(true)). */
  token: (fresh?: boolean) => Promise<string>;
  /** After each applied event, with the new lists. */
  onChange?: (state: ListenersState, event: ListenersEvent) => void;
  onStatus?: (status: ListenersStatus, detail: string) => void;
  /** Every message received, events and replies alike, before the order rules. */
  onMessage?: (message: ListenersEvent | ServerReply) => void;
  /** Default: the browser's WebSocket. */
  WebSocketImpl?: typeof WebSocket;
  /** Milliseconds between pings (default 30,000). */
  pingInterval?: number;
  /** Milliseconds of silence after a ping that make the socket dead (default 10,000). */
  pongTimeout?: number;
  /** Reconnect delays in ms: initial × 2^attempt, at most max, times a jitter of 0.5 to 1 (500, 10,000). */
  backoff?: { initial?: number; max?: number };
}

export declare class ListenersClient {
  constructor(options: ListenersClientOptions);
  start(): void;
  stop(): void;
  /** false when no socket is open. */
  send(message: ClientMessage): boolean;
  /** Sends `auth.refresh` with a fresh token now (also done a minute before expiry). */
  refresh(): Promise<void>;
  /** Reconnect now if no socket is open, else ping it (done on "online" and when shown). */
  wake(why?: string): void;
  readonly state: ListenersState;
}

/** "apply", "drop" or "gap" for each event: the order rules of docs/events.md. */
export declare class Ordering {
  constructor(recentIds?: number);
  readonly waiting: boolean;
  admit(event: ListenersEvent): "apply" | "drop" | "gap";
}

/** The order rules, and whether a resync must be asked for. */
export declare class Follower {
  constructor(recentIds?: number);
  readonly needsResync: boolean;
  lost(): void;
  /** true when the event is to be applied. */
  admit(event: ListenersEvent): boolean;
}

/** Events -> the UI's lists, as listeners_bridge/reducers.py does. */
export declare class Reducers {
  apply(event: ListenersEvent): boolean;
  readonly state: ListenersState;
}
