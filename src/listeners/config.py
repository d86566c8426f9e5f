"""Configuration from Google Secret Manager, with environment fallbacks (specification §3).

Every key is declared once, on the settings field it fills, by `key(...)`: its environment
variable, its default, its meaning, and where relevant its secret key, range, choices or rule.
`table()` gathers them; one generic reader (`read_keys`) fills `Settings` from them, `listeners
config check` lists them, and `listeners config doc` writes them into docs/configuration.md.
Adding a key is adding one field with `key(...)`; the rules on several keys are `_across_keys`.

For each key the first of these that is set wins:
1. its key in its Secret Manager secret, read only when GOOGLE_PROJECT_ID is set;
2. the environment variable;
3. the default.
Every problem is collected, so one `ConfigError` names every missing or invalid key, never a
value. Values of secrets are wrapped in `Secret` so that no repr, log line or error shows them.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import secrets
import socket
import typing
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from listeners import secret_manager
from listeners.secret_manager import SecretReader

REDIS_SECRET = "pinnokio/listeners/redis"
FIREBASE_SECRET = "pinnokio/listeners/firebase_admin"
SERVICE_SECRET = "pinnokio/listeners/service_config"
MUST_EXIST = ("redis", "aws")  # secrets that must exist once named; the others are optional
MAX_STREAMS_PER_CONNECTION = 100  # Firestore's limit per gRPC connection
TARGETS_PER_STREAM = 500  # query targets on one Listen stream (docs/benchmarks.md)
LOOPBACK_ONLY = "http:// only on loopback: 127.0.0.0/8, ::1, localhost"


class Secret:
    """A secret string that shows as *** everywhere except through `reveal()`."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


class ConfigError(Exception):
    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration: " + "; ".join(problems))


# ---------------------------------------------------------------- the declaration of a key

REQUIRED: Any = object()  # a key's default when it has none: it must be given


@dataclass(frozen=True)
class Key:
    env: str  # the environment variable: the key's name everywhere (errors, check, doc)
    default: Any  # REQUIRED, a value, or a function that makes one
    doc: str  # its meaning, one line
    secret: str = ""  # "redis.host": key `host` of the redis secret; "firebase_admin": that whole secret
    span: tuple[float, float] | None = None  # integers and numbers: the inclusive range
    choices: tuple[str, ...] = ()  # text: the values allowed (case ignored)
    check: Callable[[Any], str] | None = None  # a further rule: the problem, or ""; its __doc__ says it
    shown: str = ""  # the default as the doc shows it, when not the value itself
    # Filled in by `table()` from the field that carries the key:
    path: str = ""  # where it lands in Settings, e.g. "redis.port"
    kind: str = ""  # text, integer, number, boolean, secret or list, from the field's type
    group: str = ""  # the first line of the settings class's docstring

    @property
    def label(self) -> str:
        """How problems name the key: its variable, and its place in a secret if it has one."""
        if not self.secret:
            return self.env
        return f"{self.env} / {self.secret}" if "." in self.secret else f"{self.env} / secret {self.secret}"


def key(env: str, default: Any, doc: str, secret: str = "", **rules: Any) -> Any:
    """A settings field declared with its key (rules: the optional fields of `Key`)."""
    k = Key(env, default, doc, secret, **rules)
    if default is REQUIRED:
        return field(metadata={"key": k})
    if callable(default):
        return field(default_factory=default, metadata={"key": k})
    return field(default=default, metadata={"key": k})


def at_least_16(value: Secret) -> str:
    """at least 16 characters"""
    return "must be at least 16 characters" if len(value.reveal()) < 16 else ""


def absolute_path(value: str) -> str:
    """starts with `/`"""
    return "" if value.startswith("/") else "must start with /"


def existing_file(value: str) -> str:
    """an existing file"""
    return "" if os.path.isfile(value) else "no such file"


def https_or_loopback(url: str) -> bool:
    """An https URL with a host, or http to this machine (the tests' and the demo's local
    issuer): a certificate fetched in clear text could be swapped on the way."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme == "https":
        return bool(host)
    if parts.scheme != "http":
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def invalid_cidrs(cidrs: tuple[str, ...]) -> str:
    """CIDRs or addresses, e.g. `10.0.0.0/16`"""
    for cidr in cidrs:
        try:
            ipaddress.ip_network(cidr.strip(), strict=False)
        except ValueError:
            return f"{cidr[:60]!r} is not a CIDR"
    return ""


def certs_url(value: str) -> str:
    """https://, or http:// on loopback"""
    return "" if https_or_loopback(value) else f"must be https:// ({LOOPBACK_ONLY})"


ADMIN_KEYS = ("type", "project_id", "private_key", "client_email", "token_uri")


def service_account(value: Secret) -> str:
    """What is wrong with a service account's JSON, or ""."""
    try:
        info = json.loads(value.reveal())
    except ValueError:
        return "is not valid JSON"
    if not isinstance(info, dict):
        return "must be a JSON object"
    missing = [k for k in ADMIN_KEYS if not isinstance(info.get(k), str) or not info.get(k)]
    if missing:
        return f"missing {', '.join(missing)}"
    return "" if info["type"] == "service_account" else "type must be service_account"


def default_instance_id() -> str:
    """Unique per process: processes sharing a host (uvicorn --workers, host networking, a
    developer's machine) must not share an id, or each would believe it owns every user."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


# ---------------------------------------------------------------- the table: every key, once
# field: type = key(variable, default, meaning, its secret key, rules); docs/configuration.md shows
# each as a row. RUF009: `key` returns a dataclasses.field, whose default is immutable.
# fmt: off


@dataclass(frozen=True)
class RedisSettings:
    """Redis (the bridge reads these keys too)"""

    host: str = key("LISTENERS_REDIS_HOST", REQUIRED, "Redis host name", "redis.host")
    port: int = key("LISTENERS_REDIS_PORT", 6379, "Redis port", "redis.port", span=(1, 65535))
    password: Secret | None = key("LISTENERS_REDIS_PASSWORD", None,  # noqa: RUF009
        "the user's password (no user: the AUTH token)", "redis.password")
    username: str = key("LISTENERS_REDIS_USERNAME", "",
        "the ACL user ([below](#redis-users)); unset: `default`", "redis.username")
    tls: bool = key("LISTENERS_REDIS_TLS", False, "certificate and host name always verified", "redis.tls")
    db: int = key("LISTENERS_REDIS_DB", 0, "keep 0 under the ACL users", "redis.db", span=(0, 1023))
    channel_prefix: str = key("LISTENERS_CHANNEL_PREFIX", "user:",
        "a user's channel is prefix + uid", "redis.channel_prefix")
    ca_file: str = key("LISTENERS_REDIS_CA_FILE", "",
        "CA bundle for TLS; unset: the system's", "redis.ca_file", check=existing_file)
    chat_channel_prefix: str = key("LISTENERS_CHAT_CHANNEL_PREFIX", "chat:",
        "a chat thread's channel is prefix + `{uid}:{space_code}:{thread_key}`", "redis.chat_channel_prefix")
    control_channel: str = key("LISTENERS_CONTROL_CHANNEL", "listeners:control",
        "consumers' resync requests", "redis.control_channel")
    control_token: Secret | None = key("LISTENERS_CONTROL_TOKEN", None,  # noqa: RUF009
        "signs resync requests ([bridge.md](bridge.md)); unset: they are off", "redis.control_token",
        check=at_least_16)


@dataclass(frozen=True)
class FirebaseSettings:
    """Firebase: Firestore and the Realtime Database"""

    project_id: str = key("FIREBASE_PROJECT_ID", "", "Firestore project when no admin JSON gives one")
    admin_json: Secret | None = key("FIREBASE_ADMIN_JSON", None,  # noqa: RUF009
        "service-account JSON; required without `FIRESTORE_EMULATOR_HOST`", "firebase_admin")
    emulator_host: str = key("FIRESTORE_EMULATOR_HOST", "", "Firestore emulator `host:port`; no credentials")
    database_url: str = key("FIREBASE_REALTIME_DB_URL", "",
        "`https://NAME.firebaseio.com`; unset: no `msg.*` / `chat.*`", "service_config.realtime_db_url")
    database_emulator_host: str = key("FIREBASE_DATABASE_EMULATOR_HOST", "",
        "Realtime Database emulator `host:port`; no credentials")
    chat_mark_read: bool = key("LISTENERS_CHAT_MARK_READ", True,
        "mark delivered chat messages `read: true`", "service_config.chat_mark_read")


@dataclass(frozen=True)
class ServiceSettings:
    """Service"""

    allowed_origins: tuple[str, ...] = key("LISTENERS_ALLOWED_ORIGINS", (),
        "WebSocket `Origin` check; comma-separated in the environment", "service_config.allowed_origins")
    alb_ws_path: str = key("LISTENERS_WS_PATH", "/ws",
        "the WebSocket path", "service_config.alb_ws_path", check=absolute_path)
    heartbeat_ttl_seconds: int = key("LISTENERS_HEARTBEAT_TTL_SECONDS", 90,
        "registry TTL without `ttl_seconds`", "service_config.heartbeat_ttl_seconds", span=(1, 86_400))
    ws_url: str = key("ALB_WS_URL", "", "the public WebSocket URL; informational")
    demo_token_url: str = key("LISTENERS_DEMO_TOKEN_URL", "", "the demo's token issuer; unset: `/demo` off")
    http_header_timeout_seconds: float = key("LISTENERS_HTTP_HEADER_TIMEOUT_SECONDS", 10.0,
        "for a request's head, from the connection or the request's first byte; then the "
        "connection is closed (`UVICORN_HTTP`)", span=(0.1, 300))


@dataclass(frozen=True)
class WebSocketSettings:
    """WebSocket: Direct mode (websocket.md, security.md)"""

    certs_url: str = key("LISTENERS_TOKEN_CERTS_URL",
        "https://www.googleapis.com/robot/v1/metadata/x509/securetoken@system.gserviceaccount.com",
        "ID tokens' certificates; others only for tests and the demo", check=certs_url,
        shown="Google's securetoken certificates")
    clock_skew_seconds: float = key("LISTENERS_TOKEN_CLOCK_SKEW_SECONDS", 30.0,
        "clock skew allowed on ID tokens", span=(0, 300))
    check_revoked: bool = key("LISTENERS_TOKEN_CHECK_REVOKED", False,
        "check ID tokens for revocation at connect and `auth.refresh` (Identity Toolkit "
        "`accounts:lookup`, as `verify_id_token(check_revoked=True)`); closes with 4016")
    revocation_url: str = key("LISTENERS_TOKEN_REVOCATION_URL", "https://identitytoolkit.googleapis.com/v1",
        "the Identity Toolkit API; others only for tests", check=certs_url, shown="Identity Toolkit v1")
    revocation_ttl_seconds: float = key("LISTENERS_TOKEN_REVOCATION_TTL_SECONDS", 300.0,
        "a user's revocation state is cached this long (a revocation is seen within it)", span=(1, 3600))
    auth_timeout_seconds: float = key("LISTENERS_WS_AUTH_TIMEOUT_SECONDS", 10.0,
        "to authenticate a socket", span=(0.1, 120))
    max_frame_bytes: int = key("LISTENERS_WS_MAX_FRAME_BYTES", 16_384,
        "largest frame from a client", span=(256, 1_048_576))
    messages_per_second: float = key("LISTENERS_WS_MESSAGES_PER_SECOND", 10.0,
        "messages a socket may send per second", span=(0.1, 1000))
    max_sockets_per_user: int = key("LISTENERS_WS_MAX_SOCKETS_PER_USER", 10,
        "sockets per user", span=(1, 1000))
    max_sockets: int = key("LISTENERS_WS_MAX_SOCKETS", 10_000,
        "authenticated sockets per process", span=(1, 1_000_000))
    queue_length: int = key("LISTENERS_WS_QUEUE_LENGTH", 1_000,
        "a socket's outbound queue, in messages", span=(1, 1_000_000))
    queue_bytes: int = key("LISTENERS_WS_QUEUE_BYTES", 262_144,
        "the same in bytes (a larger event goes alone); full: a slow consumer", span=(1_024, 1 << 30))
    presence: bool = key("LISTENERS_WS_PRESENCE", False, "keep the registry online while a socket is open")
    max_unauthenticated_sockets: int = key("LISTENERS_WS_MAX_UNAUTHENTICATED_SOCKETS", 1_000,
        "sockets still authenticating, per process", span=(1, 1_000_000))
    unauthenticated_timeout_seconds: float = key("LISTENERS_WS_UNAUTHENTICATED_TIMEOUT_SECONDS", 5.0,
        "for a new socket's token", span=(0.1, 120))
    max_threads_per_user: int = key("LISTENERS_WS_MAX_THREADS_PER_USER", 20,
        "chat threads per user", span=(1, 1_000))
    chat_subscribes_per_second: float = key("LISTENERS_WS_CHAT_SUBSCRIBES_PER_SECOND", 2.0,
        "chat subscribes per socket (each a registry write)", span=(0.1, 100))
    max_event_bytes: int = key("LISTENERS_WS_MAX_EVENT_BYTES", 8 << 20,
        "larger events on Redis are not forwarded", span=(1_024, 64 << 20))
    admin_token: Secret | None = key("LISTENERS_ADMIN_TOKEN", None,  # noqa: RUF009
        "the operator pages `/ops`, `/v1/users/{uid}`; unset: off", "service_config.admin_token",
        check=at_least_16)
    deflate: str = key("LISTENERS_WS_DEFLATE", "no-context",
        "permessage-deflate of `UVICORN_WS`: no context takeover, uvicorn's, none",
        choices=("no-context", "context", "off"))
    close_timeout_seconds: float = key("LISTENERS_WS_CLOSE_TIMEOUT_SECONDS", 5.0,
        "for the client to answer a close frame, then cut (`UVICORN_WS`)", span=(0.1, 3600))
    first_message_auth_origins: tuple[str, ...] = key("LISTENERS_WS_FIRST_MESSAGE_AUTH_ORIGINS", (),
        "origins that may send the token in a first `auth` message (`*`: any, none included); "
        "others need it in the upgrade or get HTTP 401", "service_config.first_message_auth_origins")
    trusted_proxy_cidrs: tuple[str, ...] = key("LISTENERS_TRUSTED_PROXY_CIDRS", (),
        "our proxies (the ALB's subnets or the VPC): the client is the right-most other "
        "`X-Forwarded-For` hop; unset: the peer address", "service_config.trusted_proxy_cidrs",
        check=invalid_cidrs)
    handshakes_per_second_per_address: float = key("LISTENERS_WS_HANDSHAKES_PER_SECOND_PER_ADDRESS", 10.0,
        "upgrades per client address (IPv6: per /64); over it: HTTP 429", span=(0.1, 10_000))
    handshake_burst_per_address: int = key("LISTENERS_WS_HANDSHAKE_BURST_PER_ADDRESS", 100,
        "upgrades a client address may make at once (a reconnect after a deploy)", span=(1, 1_000_000))
    max_unauthenticated_per_address: int = key("LISTENERS_WS_MAX_UNAUTHENTICATED_PER_ADDRESS", 50,
        "sockets still authenticating per client address; over it: HTTP 429", span=(1, 1_000_000))
    rate_refusal_delay_seconds: float = key("LISTENERS_WS_RATE_REFUSAL_DELAY_SECONDS", 2.0,
        "a 429 for the handshake rate is answered this long later (±50 %, at random; "
        "`UVICORN_HTTP`): a caller that reconnects at once is slowed to a few attempts a second; 0: at once",
        span=(0, 60))
    max_delayed_refusals: int = key("LISTENERS_WS_MAX_DELAYED_REFUSALS", 5_000,
        "answers held back that way at once, per process (each a connection); beyond it: at once",
        span=(0, 1_000_000))
    tracked_addresses: int = key("LISTENERS_WS_TRACKED_ADDRESSES", 100_000,
        "client addresses remembered for those limits (the idle least recent forgotten)",
        span=(100, 10_000_000))


@dataclass(frozen=True)
class SecretNames:
    """Secret names"""

    # Each field is named after the secret it names: a key's secret "redis.host" is key `host`
    # of the secret named by the field `redis`; "firebase_admin", that whole secret.

    redis: str = key("LISTENERS_REDIS_SECRET", REDIS_SECRET, "must exist")
    firebase_admin: str = key("LISTENERS_FIREBASE_SECRET", FIREBASE_SECRET, "may be absent")
    service_config: str = key("LISTENERS_SERVICE_SECRET", SERVICE_SECRET, "may be absent")
    aws: str = key("AWS_SECRET_NAME", "", "AWS parameters: if named, must exist; no key used yet")


@dataclass(frozen=True)
class Settings:
    """The process, and Secret Manager"""

    redis: RedisSettings
    firebase: FirebaseSettings
    service: ServiceSettings = field(default_factory=ServiceSettings)
    websocket: WebSocketSettings = field(default_factory=WebSocketSettings)
    aws_region: str = key("AWS_REGION_NAME", "", "AWS region; required when `GOOGLE_PROJECT_ID` is set")
    google_project_id: str = key("GOOGLE_PROJECT_ID", "", "the secrets' project; unset: no Secret Manager")
    google_service_account_secret: str = key("GOOGLE_SERVICE_ACCOUNT_SECRET", "",
        "a secret holding the service account that reads the others")
    google_credentials_json: Secret | None = key("GOOGLE_APPLICATION_CREDENTIALS_JSON", None,  # noqa: RUF009
        "service account for Secret Manager (ECS task `secrets`)")
    instance_id: str = key("LISTENERS_INSTANCE_ID", default_instance_id,
        "this process's id; if set, unique per process ([below](#instance-id))",
        shown="`{host}-{pid}-{6 random hex}`")
    log_level: str = key("LOG_LEVEL", "INFO", "the log level",
        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"))
    sweep_interval_seconds: float = key("LISTENERS_SWEEP_INTERVAL_SECONDS", 1.0,
        "expiry is noticed within TTL + this", span=(0.05, 5.0))
    max_streams_per_connection: int = key("LISTENERS_MAX_STREAMS_PER_CONNECTION", MAX_STREAMS_PER_CONNECTION,
        "Firestore streams per gRPC connection", span=(1, MAX_STREAMS_PER_CONNECTION))
    firestore_source: str = key("LISTENERS_FIRESTORE_SOURCE", "listen",
        "[below](#firestore-source)", choices=("listen", "sdk"))
    rtdb_transport: str = key("LISTENERS_RTDB_TRANSPORT", "rest",
        "[below](#realtime-database-transport)", choices=("rest", "wire"))
    targets_per_stream: int = key("LISTENERS_FIRESTORE_TARGETS_PER_STREAM", TARGETS_PER_STREAM,
        "`listen` source only ([below](#targets-per-stream))", span=(1, 100_000))
    publish_queue_max: int = key("LISTENERS_PUBLISH_QUEUE_MAX", 10_000,
        "events beyond it are dropped, their users resynced", span=(100, 10_000_000))
    shutdown_timeout_seconds: float = key("LISTENERS_SHUTDOWN_TIMEOUT_SECONDS", 8.0,
        "from SIGTERM to exit", span=(0.5, 60.0))
    single_instance: bool = key("LISTENERS_SINGLE_INSTANCE", False,
        "true only where one instance runs ([below](#single-instance))")
    sync_each_change: bool = key("LISTENERS_SYNC_EACH_CHANGE", False,
        "a whole-list sync after every batch of deltas, as before issue 14")
    chat_history: int = key("LISTENERS_CHAT_HISTORY", 100,
        "messages mirrored per chat thread (`limitToLast`)", span=(1, 10_000))
    secrets: SecretNames = field(default_factory=SecretNames)


# fmt: on
# ---------------------------------------------------------------- the reader

_KINDS: dict[Any, str] = {
    str: "text",
    int: "integer",
    float: "number",
    bool: "boolean",
    Secret | None: "secret",
    tuple[str, ...]: "list",
}


_TABLES: dict[type, tuple[Key, ...]] = {}


def table(root: type = Settings) -> tuple[Key, ...]:
    """Every key of `root` and of the settings it nests: each class's own keys first, in order."""
    if root not in _TABLES:
        _TABLES[root] = tuple(_keys(root, ""))
    return _TABLES[root]


def _keys(cls: type, prefix: str) -> Iterator[Key]:
    hints = typing.get_type_hints(cls)
    group = (cls.__doc__ or cls.__name__).splitlines()[0]
    for f in dataclasses.fields(cls):
        if "key" in f.metadata:
            kind = _KINDS[hints[f.name]]
            yield dataclasses.replace(f.metadata["key"], path=prefix + f.name, kind=kind, group=group)
    for f in dataclasses.fields(cls):
        if "key" not in f.metadata and dataclasses.is_dataclass(hints[f.name]):
            yield from _keys(hints[f.name], f"{prefix}{f.name}.")


@dataclass(frozen=True)
class Value:
    value: Any
    source: str  # "secret <name>", "environment" or "default"


def _parse(k: Key, raw: Any) -> tuple[Any, str]:
    """The value of `raw` for key `k`, and the problem ("" when none)."""
    if k.kind in ("text", "secret"):
        if not isinstance(raw, str | int) or isinstance(raw, bool):
            return None, "must be a string"
        text = str(raw)
        if k.kind == "secret":
            return (Secret(text) if text else None), ""
        if k.choices:
            found = [c for c in k.choices if c.lower() == text.strip().lower()]
            return (found[0], "") if found else (None, f"must be {_either(k.choices)}")
        return text, ""
    if k.kind == "boolean":
        lowered = str(raw).strip().lower()
        if isinstance(raw, bool) or lowered in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return raw if isinstance(raw, bool) else lowered in ("1", "true", "yes", "on"), ""
        return None, "must be true or false"
    if k.kind == "list":
        if isinstance(raw, str):
            return tuple(o.strip() for o in raw.split(",") if o.strip()), ""
        if isinstance(raw, list) and all(isinstance(o, str) for o in raw):
            return tuple(raw), ""
        return None, "must be a list of strings"
    low, high = k.span or (0, 0)
    number: float | None
    try:
        if k.kind == "integer":
            number = int(raw) if not isinstance(raw, bool | float) else None
        else:
            number = float(raw)
    except (TypeError, ValueError):
        number = None
    if number is None or not low <= number <= high:
        article = "an integer" if k.kind == "integer" else "a number"
        return None, f"must be {article} from {low} to {high}"
    return number, ""


def _default(k: Key) -> Any:
    if k.default is REQUIRED:
        return ""  # reported missing; a value only to go on with the other keys
    return k.default() if callable(k.default) else k.default


def _either(choices: tuple[str, ...]) -> str:
    return f"{', '.join(choices[:-1])} or {choices[-1]}" if len(choices) > 1 else choices[0]


def _fetch(read: SecretReader, name: str, whole: bool, must_exist: bool, problems: list[str]) -> Any:
    """A secret's text (whole) or JSON object; None when absent or broken (named in problems)."""
    try:
        raw = read(name)
    except Exception as exc:  # the reader's message names the secret, never its value
        problems.append(f"secret {name}: cannot be read ({type(exc).__name__}: {exc})")
        return None
    if raw is None:
        if must_exist:
            problems.append(f"secret {name}: not found")
        return None
    if whole:
        return raw or None
    try:
        data = json.loads(raw)
    except ValueError:
        problems.append(f"secret {name}: is not valid JSON")
        return None
    if not isinstance(data, dict):
        problems.append(f"secret {name}: must be a JSON object")
        return None
    return data


def read_keys(
    keys: Iterable[Key], env: Mapping[str, str], read_secret: SecretReader | None = None
) -> tuple[dict[str, Value], list[str]]:
    """Each key's value by its variable, and the problems. The keys of the environment alone come
    first: they say whether Secret Manager is used (GOOGLE_PROJECT_ID), how, and which secrets."""
    keys = tuple(keys)
    values: dict[str, Value] = {}
    problems: list[str] = []

    def take(k: Key, raw: Any, source: str) -> None:
        value, problem = None, "missing" if k.default is REQUIRED else ""
        if raw is not None:
            value, problem = _parse(k, raw)
            if not problem and k.check is not None and value is not None:
                problem = k.check(value)
        if problem:
            problems.append(f"{k.label}: {problem}")
        if raw is None or problem:
            value, source = _default(k), "default"
        values[k.env] = Value(value, source)

    for k in keys:
        if not k.secret:
            take(k, env.get(k.env) or None, "environment")
    found = _secrets(keys, {n: v.value for n, v in values.items()}, read_secret, problems)
    for k in keys:
        if k.secret:
            secret, _, inside = k.secret.partition(".")
            name, data = found.get(secret, ("", None))
            raw = (data or {}).get(inside) if inside else data
            if raw is not None:
                take(k, raw, f"secret {name}")
            else:
                take(k, env.get(k.env) or None, "environment")
    return values, problems


def _secrets(
    keys: tuple[Key, ...], given: Mapping[str, Any], read: SecretReader | None, problems: list[str]
) -> dict[str, tuple[str, Any]]:
    """Each secret named by a `secrets.*` key of `keys`: (its name, its JSON object, or its text
    if read whole). Nothing without GOOGLE_PROJECT_ID, or when no key comes from a secret."""
    if not given.get("GOOGLE_PROJECT_ID") or not any(k.secret for k in keys):
        return {}
    if read is None:
        credentials = given.get("GOOGLE_APPLICATION_CREDENTIALS_JSON")
        try:
            read = secret_manager.connect(
                given["GOOGLE_PROJECT_ID"],
                given.get("GOOGLE_SERVICE_ACCOUNT_SECRET") or "",
                credentials.reveal() if credentials else "",
            )
        except secret_manager.Unreachable as exc:
            raise ConfigError([str(exc)]) from None
    whole = {k.secret for k in keys if k.secret and "." not in k.secret}
    found = {}
    for k in keys:
        secret, name = k.path.removeprefix("secrets."), given.get(k.env)
        if k.path.startswith("secrets.") and name:
            found[secret] = (name, _fetch(read, name, secret in whole, secret in MUST_EXIST, problems))
    return found


_ADMIN = "FIREBASE_ADMIN_JSON / secret firebase_admin"  # that key's label


def _across_keys(v: Callable[[str], Any], problems: list[str]) -> dict[str, Any]:
    """The rules on several keys; returns the values they decide, by variable."""
    if v("GOOGLE_PROJECT_ID") and not v("AWS_REGION_NAME"):
        problems.append("AWS_REGION_NAME: missing (required when GOOGLE_PROJECT_ID is set)")
    admin, project = v("FIREBASE_ADMIN_JSON"), v("FIREBASE_PROJECT_ID")
    wrong = service_account(admin) if admin is not None else ""
    if wrong:
        problems.append(f"{_ADMIN}: {wrong}")
    elif admin is not None:  # a service account: its project wins
        project = json.loads(admin.reveal())["project_id"]
    elif not v("FIRESTORE_EMULATOR_HOST"):
        problems.append(f"{_ADMIN}: missing (required without FIRESTORE_EMULATOR_HOST)")
    elif not project:
        problems.append("FIREBASE_PROJECT_ID: missing (needed with the emulator when no admin JSON is given)")
    url = v("FIREBASE_REALTIME_DB_URL")
    if url and not v("FIREBASE_DATABASE_EMULATOR_HOST"):
        if not url.startswith("https://"):
            problems.append("FIREBASE_REALTIME_DB_URL: must start with https://")
        if admin is None:
            problems.append("FIREBASE_ADMIN_JSON: needed for FIREBASE_REALTIME_DB_URL without an emulator")
    return {"FIREBASE_PROJECT_ID": project}


def _build(cls: type, values: Mapping[str, Any]) -> Any:
    """An instance of settings class `cls`, each field from its key's value."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if "key" in f.metadata:
            kwargs[f.name] = values[f.metadata["key"].env]
        elif dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = _build(hints[f.name], values)
    return cls(**kwargs)


def load(
    env: Mapping[str, str] | None = None,
    read_secret: SecretReader | None = None,
    root: type[Settings] = Settings,
) -> tuple[Settings, dict[str, Value]]:
    """The settings, and each key's value and source; `ConfigError` names every problem at once.

    `read_secret` defaults to Google Secret Manager when GOOGLE_PROJECT_ID is set.
    """
    values, problems = read_keys(table(root), os.environ if env is None else env, read_secret)
    given = {name: v.value for name, v in values.items()}
    given.update(_across_keys(given.__getitem__, problems))
    if problems:
        raise ConfigError(problems)
    settings: Settings = _build(root, given)
    return settings, values


def load_settings(env: Mapping[str, str] | None = None, read_secret: SecretReader | None = None) -> Settings:
    """Read and validate everything; raise `ConfigError` naming every problem at once."""
    return load(env, read_secret)[0]


def load_redis_settings(
    env: Mapping[str, str] | None = None, read_secret: SecretReader | None = None
) -> RedisSettings:
    """Only the Redis keys, with the same names, precedence and Secret Manager set-up: for
    consumers such as the bridge."""
    wanted = ("redis.", "secrets.redis", "google_")  # google_*: where Secret Manager is
    keys = [k for k in table() if k.path.startswith(wanted)]
    values, problems = read_keys(keys, os.environ if env is None else env, read_secret)
    if problems:
        raise ConfigError(problems)
    redis: RedisSettings = _build(RedisSettings, {name: v.value for name, v in values.items()})
    return redis


def read_env(names: Iterable[str], env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Keys of the table from the environment alone (no secret), by variable: for what reads a
    few keys outside the settings (the WebSocket protocol, the CLI). `ConfigError` if invalid."""
    by_env = {k.env: k for k in table()}
    keys = [dataclasses.replace(by_env[name], secret="") for name in names]
    values, problems = read_keys(keys, os.environ if env is None else env)
    if problems:
        raise ConfigError(problems)
    return {name: v.value for name, v in values.items()}
