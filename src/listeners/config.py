"""The service's configuration (specification §3): its keys, declared as a table.

Each key is declared once, on the settings field it fills, by `key(...)` (listeners_bridge.settings
holds that machinery and the keys a consumer shares: Redis and Secret Manager). `table()`
gathers them; `load` fills `Settings`, `listeners config check` lists them, and `listeners
config doc` writes them into docs/configuration.md. Adding a key is adding one field with
`key(...)`; the rules on several keys are `_across_keys`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import socket
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from listeners_bridge import settings as table_reader
from listeners_bridge.secret_manager import SecretReader
from listeners_bridge.settings import (
    REDIS_SECRET,
    REQUIRED,
    ConfigError,
    ConsumerSettings,
    Key,
    RedisSecretNames,
    RedisSettings,
    Secret,
    Value,
    at_least_16,
    key,
    load_redis_settings,
    read_keys,
)

__all__ = [  # what the service and its tests take from here; the machinery is the bridge's
    "REDIS_SECRET",
    "REQUIRED",
    "ConfigError",
    "Key",
    "RedisSettings",
    "Secret",
    "Value",
    "load_redis_settings",
]

FIREBASE_SECRET = "pinnokio/listeners/firebase_admin"
SERVICE_SECRET = "pinnokio/listeners/service_config"
MAX_STREAMS_PER_CONNECTION = 100  # Firestore's limit per gRPC connection
TARGETS_PER_STREAM = 500  # query targets on one Listen stream (docs/benchmarks.md)
LOOPBACK_ONLY = "http:// only on loopback: 127.0.0.0/8, ::1, localhost"


def absolute_path(value: str) -> str:
    """starts with `/`"""
    return "" if value.startswith("/") else "must start with /"


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
class SecretNames(RedisSecretNames):
    """Secret names"""

    firebase_admin: str = key("LISTENERS_FIREBASE_SECRET", FIREBASE_SECRET, "may be absent")
    service_config: str = key("LISTENERS_SERVICE_SECRET", SERVICE_SECRET, "may be absent")
    aws: str = key("AWS_SECRET_NAME", "", "AWS parameters: if named, must exist; no key used yet")


@dataclass(frozen=True, kw_only=True)
class Settings(ConsumerSettings):
    """The process, and Secret Manager"""

    firebase: FirebaseSettings
    service: ServiceSettings = field(default_factory=ServiceSettings)
    websocket: WebSocketSettings = field(default_factory=WebSocketSettings)
    aws_region: str = key("AWS_REGION_NAME", "", "AWS region; required when `GOOGLE_PROJECT_ID` is set")
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
    secrets: SecretNames = field(default_factory=SecretNames)  # the service's secrets too




# fmt: on


def table(root: type = Settings) -> tuple[Key, ...]:
    """Every key of the service's settings (or of `root`), each class's own keys first."""
    return table_reader.table(root)


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
    settings: Settings = table_reader.build(root, given)
    return settings, values


def load_settings(env: Mapping[str, str] | None = None, read_secret: SecretReader | None = None) -> Settings:
    """Read and validate everything; raise `ConfigError` naming every problem at once."""
    return load(env, read_secret)[0]


def read_env(names: Iterable[str], env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Keys of the table from the environment alone (no secret), by variable: for what reads a
    few keys outside the settings (the WebSocket protocol, the CLI). `ConfigError` if invalid."""
    by_env = {k.env: k for k in table()}
    keys = [replace(by_env[name], secret="") for name in names]
    values, problems = read_keys(keys, os.environ if env is None else env)
    if problems:
        raise ConfigError(problems)
    return {name: v.value for name, v in values.items()}
