"""Configuration from Google Secret Manager, with environment fallbacks (specification §3).

For each key the first of these that is set wins (docs/configuration.md has the table):
1. the key in its Secret Manager secret, read only when GOOGLE_PROJECT_ID is set;
2. the environment variable of the specification's name;
3. the documented default.
Every problem is collected, so one `ConfigError` names every missing or invalid key.
Values of secrets are wrapped in `Secret` so that no repr, log line or error shows them.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import secrets
import socket
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

REDIS_SECRET = "pinnokio/listeners/redis"
FIREBASE_SECRET = "pinnokio/listeners/firebase_admin"
SERVICE_SECRET = "pinnokio/listeners/service_config"
MAX_STREAMS_PER_CONNECTION = 100  # Firestore's limit per gRPC connection
FIRESTORE_SOURCES = ("listen", "sdk")  # the multiplexed Listen client, or the SDK's on_snapshot
TARGETS_PER_STREAM = 500  # query targets on one Listen stream (docs/benchmarks.md)

SecretReader = Callable[[str], str | None]  # None when the secret does not exist


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


@dataclass(frozen=True)
class RedisSettings:
    host: str
    port: int = 6379
    password: Secret | None = None
    username: str = ""
    tls: bool = False
    db: int = 0
    channel_prefix: str = "user:"
    ca_file: str = ""
    chat_channel_prefix: str = "chat:"
    control_channel: str = "listeners:control"
    control_token: Secret | None = None  # shared with consumers; signs their resync requests


@dataclass(frozen=True)
class FirebaseSettings:
    project_id: str
    admin_json: Secret | None = None  # the service account JSON; None with the emulator
    emulator_host: str = ""
    database_url: str = ""  # the Realtime Database; empty: no msg.* / chat.* streams
    database_emulator_host: str = ""
    chat_mark_read: bool = True


@dataclass(frozen=True)
class ServiceSettings:
    allowed_origins: tuple[str, ...] = ()
    alb_ws_path: str = "/ws"
    heartbeat_ttl_seconds: int = 90
    ws_url: str = ""


@dataclass(frozen=True)
class WebSocketSettings:
    """Direct mode: browsers on `alb_ws_path` with Firebase ID tokens (docs/websocket.md)."""

    certs_url: str = (
        "https://www.googleapis.com/robot/v1/metadata/x509/securetoken@system.gserviceaccount.com"
    )
    clock_skew_seconds: float = 30.0
    auth_timeout_seconds: float = 10.0
    max_frame_bytes: int = 16_384
    messages_per_second: float = 10.0
    max_sockets_per_user: int = 10
    max_sockets: int = 10_000  # authenticated sockets; those still authenticating have their own cap
    queue_length: int = 1_000
    # The outbound queue's bytes too: a socket that stops reading holds at most this much (one
    # event larger than it still goes through, alone) before it is closed as a slow consumer.
    queue_bytes: int = 262_144
    presence: bool = False
    # A socket that never authenticates costs its client nothing: a smaller cap and a shorter deadline
    # keep a flood of them from crowding out users (docs/websocket.md).
    max_unauthenticated_sockets: int = 1_000
    unauthenticated_timeout_seconds: float = 5.0
    max_threads_per_user: int = 20
    chat_subscribes_per_second: float = 2.0  # each one is a registry write every instance reads
    max_event_bytes: int = 8 * 1024 * 1024  # an event on Redis larger than this is not forwarded
    admin_token: Secret | None = None  # the operations page; off without it


def default_instance_id() -> str:
    """Unique per process: processes sharing a host (uvicorn --workers, host networking, a
    developer's machine) must not share an id, or each would believe it owns every user."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class Settings:
    redis: RedisSettings
    firebase: FirebaseSettings
    service: ServiceSettings = field(default_factory=ServiceSettings)
    websocket: WebSocketSettings = field(default_factory=WebSocketSettings)
    aws_region: str = ""
    google_project_id: str = ""
    instance_id: str = field(default_factory=default_instance_id)
    log_level: str = "INFO"
    sweep_interval_seconds: float = 1.0
    max_streams_per_connection: int = MAX_STREAMS_PER_CONNECTION
    firestore_source: str = "listen"
    targets_per_stream: int = TARGETS_PER_STREAM
    publish_queue_max: int = 10_000
    shutdown_timeout_seconds: float = 8.0
    # Exactly one instance is deployed: serve every user even while Redis (hence the
    # membership that says who serves whom) cannot be reached. Off: nobody is served until the
    # membership is established, so that no two instances ever serve one user.
    single_instance: bool = False
    # Issue 14: a sync after every batch of deltas, as before, for consumers not yet migrated to
    # `seq`/`epoch`; off, deltas travel alone (a few hundred bytes instead of the whole list).
    sync_each_change: bool = False
    chat_history: int = 100  # messages mirrored per chat thread: the Realtime Database's limitToLast


class _Reader:
    """Looks keys up in a secret's JSON, then the environment; records problems."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []

    def secret_json(self, read: SecretReader | None, name: str, required: bool) -> dict[str, Any]:
        if read is None:
            return {}
        try:
            raw = read(name)
        except Exception as exc:  # the reader's message names the secret, never its value
            self.problems.append(f"secret {name}: cannot be read ({type(exc).__name__}: {exc})")
            return {}
        if raw is None:
            if required:
                self.problems.append(f"secret {name}: not found")
            return {}
        try:
            data = json.loads(raw)
        except ValueError:
            self.problems.append(f"secret {name}: is not valid JSON")
            return {}
        if not isinstance(data, dict):
            self.problems.append(f"secret {name}: must be a JSON object")
            return {}
        return data

    def get(self, secret: Mapping[str, Any], key: str, env_name: str) -> Any:
        if key in secret and secret[key] is not None:
            return secret[key]
        value = self.env.get(env_name)
        return value if value not in (None, "") else None

    def text(self, value: Any, name: str, default: str | None = None) -> str:
        if value is None:
            if default is None:
                self.problems.append(f"{name}: missing")
                return ""
            return default
        if not isinstance(value, str | int) or isinstance(value, bool):
            self.problems.append(f"{name}: must be a string")
            return default or ""
        return str(value)

    def integer(self, value: Any, name: str, default: int, low: int, high: int) -> int:
        if value is None:
            return default
        try:
            number = int(value) if not isinstance(value, bool | float) else None
        except ValueError:
            number = None
        if number is None or not low <= number <= high:
            self.problems.append(f"{name}: must be an integer from {low} to {high}")
            return default
        return number

    def number(self, value: Any, name: str, default: float, low: float, high: float) -> float:
        if value is None:
            return default
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = float("nan")
        if not low <= number <= high:
            self.problems.append(f"{name}: must be a number from {low} to {high}")
            return default
        return number

    def boolean(self, value: Any, name: str, default: bool) -> bool:
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        lowered = str(value).strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        self.problems.append(f"{name}: must be true or false")
        return default


def load_settings(env: Mapping[str, str] | None = None, read_secret: SecretReader | None = None) -> Settings:
    """Read and validate everything; raise `ConfigError` naming every problem at once.

    `read_secret` defaults to Google Secret Manager when GOOGLE_PROJECT_ID is set.
    """
    env = os.environ if env is None else env
    r = _Reader(env)
    project = env.get("GOOGLE_PROJECT_ID", "")
    if project and read_secret is None:
        from listeners.secret_manager import secret_reader

        try:
            read_secret = secret_reader(
                project,
                env.get("GOOGLE_SERVICE_ACCOUNT_SECRET", ""),
                env.get("GOOGLE_APPLICATION_CREDENTIALS_JSON", ""),
            )
        except Exception as exc:
            raise ConfigError(
                [f"Google Secret Manager: cannot connect ({type(exc).__name__}: {exc})"]
            ) from None
    if not project:
        read_secret = None
    elif not env.get("AWS_REGION_NAME"):
        r.problems.append("AWS_REGION_NAME: missing (required when GOOGLE_PROJECT_ID is set)")

    redis_secret = r.secret_json(read_secret, env.get("LISTENERS_REDIS_SECRET", REDIS_SECRET), required=True)
    emulator = env.get("FIRESTORE_EMULATOR_HOST", "")
    firebase_secret_name = env.get("LISTENERS_FIREBASE_SECRET", FIREBASE_SECRET)
    firebase_raw: str | None = None
    if read_secret is not None:
        try:
            firebase_raw = read_secret(firebase_secret_name)
        except Exception as exc:
            r.problems.append(f"secret {firebase_secret_name}: cannot be read ({type(exc).__name__}: {exc})")
    firebase_raw = firebase_raw or env.get("FIREBASE_ADMIN_JSON") or None
    service_secret = r.secret_json(
        read_secret, env.get("LISTENERS_SERVICE_SECRET", SERVICE_SECRET), required=False
    )
    aws_name = env.get("AWS_SECRET_NAME", "")
    if aws_name:
        r.secret_json(read_secret, aws_name, required=True)  # validated now; no key of it is used yet

    redis = _redis_settings(r, redis_secret)

    firebase = _firebase(r, firebase_raw, emulator, env.get("FIREBASE_PROJECT_ID", ""))
    database_url = r.text(
        r.get(service_secret, "realtime_db_url", "FIREBASE_REALTIME_DB_URL"), "FIREBASE_REALTIME_DB_URL", ""
    )
    database_emulator = env.get("FIREBASE_DATABASE_EMULATOR_HOST", "")
    if database_url and not database_url.startswith("https://") and not database_emulator:
        r.problems.append("FIREBASE_REALTIME_DB_URL: must start with https://")
    if database_url and not database_emulator and firebase.admin_json is None:
        r.problems.append("FIREBASE_ADMIN_JSON: needed for FIREBASE_REALTIME_DB_URL without an emulator")
    firebase = dataclasses.replace(
        firebase,
        database_url=database_url,
        database_emulator_host=database_emulator,
        chat_mark_read=r.boolean(
            r.get(service_secret, "chat_mark_read", "LISTENERS_CHAT_MARK_READ"),
            "LISTENERS_CHAT_MARK_READ",
            True,
        ),
    )

    origins = r.get(service_secret, "allowed_origins", "LISTENERS_ALLOWED_ORIGINS")
    if isinstance(origins, str):
        origins = [o.strip() for o in origins.split(",") if o.strip()]
    if origins is not None and (
        not isinstance(origins, list) or not all(isinstance(o, str) for o in origins)
    ):
        r.problems.append("allowed_origins: must be a list of strings")
        origins = []
    ws_path = r.text(r.get(service_secret, "alb_ws_path", "LISTENERS_WS_PATH"), "alb_ws_path", "/ws")
    if not ws_path.startswith("/"):
        r.problems.append("alb_ws_path: must start with /")
    service = ServiceSettings(
        allowed_origins=tuple(origins or ()),
        alb_ws_path=ws_path,
        heartbeat_ttl_seconds=r.integer(
            r.get(service_secret, "heartbeat_ttl_seconds", "LISTENERS_HEARTBEAT_TTL_SECONDS"),
            "heartbeat_ttl_seconds",
            90,
            1,
            86_400,
        ),
        ws_url=env.get("ALB_WS_URL", ""),
    )

    websocket = _websocket(r, env, service_secret)

    firestore_source = env.get("LISTENERS_FIRESTORE_SOURCE", "listen").strip().lower() or "listen"
    if firestore_source not in FIRESTORE_SOURCES:
        r.problems.append("LISTENERS_FIRESTORE_SOURCE: must be listen or sdk")
        firestore_source = "listen"
    log_level = env.get("LOG_LEVEL", "INFO").upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        r.problems.append("LOG_LEVEL: must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
    settings = Settings(
        redis=redis,
        firebase=firebase,
        service=service,
        websocket=websocket,
        aws_region=env.get("AWS_REGION_NAME", ""),
        google_project_id=project,
        instance_id=env.get("LISTENERS_INSTANCE_ID") or default_instance_id(),
        log_level=log_level,
        sweep_interval_seconds=r.number(
            env.get("LISTENERS_SWEEP_INTERVAL_SECONDS"),
            "LISTENERS_SWEEP_INTERVAL_SECONDS",
            1.0,
            0.05,
            5.0,
        ),
        max_streams_per_connection=r.integer(
            env.get("LISTENERS_MAX_STREAMS_PER_CONNECTION"),
            "LISTENERS_MAX_STREAMS_PER_CONNECTION",
            MAX_STREAMS_PER_CONNECTION,
            1,
            MAX_STREAMS_PER_CONNECTION,
        ),
        firestore_source=firestore_source,
        targets_per_stream=r.integer(
            env.get("LISTENERS_FIRESTORE_TARGETS_PER_STREAM"),
            "LISTENERS_FIRESTORE_TARGETS_PER_STREAM",
            TARGETS_PER_STREAM,
            1,
            100_000,
        ),
        publish_queue_max=r.integer(
            env.get("LISTENERS_PUBLISH_QUEUE_MAX"),
            "LISTENERS_PUBLISH_QUEUE_MAX",
            10_000,
            100,
            10_000_000,
        ),
        shutdown_timeout_seconds=r.number(
            env.get("LISTENERS_SHUTDOWN_TIMEOUT_SECONDS"),
            "LISTENERS_SHUTDOWN_TIMEOUT_SECONDS",
            8.0,
            0.5,
            60.0,
        ),
        single_instance=r.boolean(env.get("LISTENERS_SINGLE_INSTANCE"), "LISTENERS_SINGLE_INSTANCE", False),
        sync_each_change=r.boolean(
            env.get("LISTENERS_SYNC_EACH_CHANGE"), "LISTENERS_SYNC_EACH_CHANGE", False
        ),
        chat_history=r.integer(env.get("LISTENERS_CHAT_HISTORY"), "LISTENERS_CHAT_HISTORY", 100, 1, 10_000),
    )
    if r.problems:
        raise ConfigError(r.problems)
    return settings


def load_redis_settings(
    env: Mapping[str, str] | None = None, read_secret: SecretReader | None = None
) -> RedisSettings:
    """Only the Redis part, with the same names and precedence: for consumers such as the bridge."""
    env = os.environ if env is None else env
    r = _Reader(env)
    project = env.get("GOOGLE_PROJECT_ID", "")
    if project and read_secret is None:
        from listeners.secret_manager import secret_reader

        read_secret = secret_reader(
            project,
            env.get("GOOGLE_SERVICE_ACCOUNT_SECRET", ""),
            env.get("GOOGLE_APPLICATION_CREDENTIALS_JSON", ""),
        )
    redis_secret = r.secret_json(
        read_secret if project else None, env.get("LISTENERS_REDIS_SECRET", REDIS_SECRET), required=True
    )
    redis = _redis_settings(r, redis_secret)
    if r.problems:
        raise ConfigError(r.problems)
    return redis


def _redis_settings(r: _Reader, redis_secret: Mapping[str, Any]) -> RedisSettings:
    redis = RedisSettings(
        host=r.text(r.get(redis_secret, "host", "LISTENERS_REDIS_HOST"), "LISTENERS_REDIS_HOST / redis.host"),
        port=r.integer(
            r.get(redis_secret, "port", "LISTENERS_REDIS_PORT"),
            "LISTENERS_REDIS_PORT / redis.port",
            6379,
            1,
            65535,
        ),
        password=_secret(r.get(redis_secret, "password", "LISTENERS_REDIS_PASSWORD")),
        username=r.text(
            r.get(redis_secret, "username", "LISTENERS_REDIS_USERNAME"),
            "LISTENERS_REDIS_USERNAME / redis.username",
            "",
        ),
        tls=r.boolean(
            r.get(redis_secret, "tls", "LISTENERS_REDIS_TLS"),
            "LISTENERS_REDIS_TLS / redis.tls",
            False,
        ),
        db=r.integer(
            r.get(redis_secret, "db", "LISTENERS_REDIS_DB"),
            "LISTENERS_REDIS_DB / redis.db",
            0,
            0,
            1023,
        ),
        channel_prefix=r.text(
            r.get(redis_secret, "channel_prefix", "LISTENERS_CHANNEL_PREFIX"),
            "LISTENERS_CHANNEL_PREFIX",
            "user:",
        ),
        ca_file=r.text(
            r.get(redis_secret, "ca_file", "LISTENERS_REDIS_CA_FILE"), "LISTENERS_REDIS_CA_FILE", ""
        ),
        chat_channel_prefix=r.text(
            r.get(redis_secret, "chat_channel_prefix", "LISTENERS_CHAT_CHANNEL_PREFIX"),
            "LISTENERS_CHAT_CHANNEL_PREFIX",
            "chat:",
        ),
        control_channel=r.text(
            r.get(redis_secret, "control_channel", "LISTENERS_CONTROL_CHANNEL"),
            "LISTENERS_CONTROL_CHANNEL",
            "listeners:control",
        ),
        control_token=_secret(r.get(redis_secret, "control_token", "LISTENERS_CONTROL_TOKEN")),
    )
    if redis.control_token is not None and len(redis.control_token.reveal()) < 16:
        r.problems.append("LISTENERS_CONTROL_TOKEN / redis.control_token: must be at least 16 characters")
    if redis.ca_file and not os.path.isfile(redis.ca_file):
        r.problems.append("LISTENERS_REDIS_CA_FILE: no such file")

    return redis


def _websocket(r: _Reader, env: Mapping[str, str], secret: Mapping[str, Any]) -> WebSocketSettings:
    default = WebSocketSettings()
    admin = _secret(r.get(secret, "admin_token", "LISTENERS_ADMIN_TOKEN"))
    if admin is not None and len(admin.reveal()) < 16:
        r.problems.append("LISTENERS_ADMIN_TOKEN / admin_token: must be at least 16 characters")
    certs_url = r.text(env.get("LISTENERS_TOKEN_CERTS_URL"), "LISTENERS_TOKEN_CERTS_URL", default.certs_url)
    if not https_or_loopback(certs_url):  # whoever serves the certificates decides who signs in
        r.problems.append(f"LISTENERS_TOKEN_CERTS_URL: must be https:// ({LOOPBACK_ONLY})")
    return WebSocketSettings(
        certs_url=certs_url,
        clock_skew_seconds=r.number(
            env.get("LISTENERS_TOKEN_CLOCK_SKEW_SECONDS"), "LISTENERS_TOKEN_CLOCK_SKEW_SECONDS", 30.0, 0, 300
        ),
        auth_timeout_seconds=r.number(
            env.get("LISTENERS_WS_AUTH_TIMEOUT_SECONDS"), "LISTENERS_WS_AUTH_TIMEOUT_SECONDS", 10.0, 0.1, 120
        ),
        max_frame_bytes=r.integer(
            env.get("LISTENERS_WS_MAX_FRAME_BYTES"), "LISTENERS_WS_MAX_FRAME_BYTES", 16_384, 256, 1_048_576
        ),
        messages_per_second=r.number(
            env.get("LISTENERS_WS_MESSAGES_PER_SECOND"), "LISTENERS_WS_MESSAGES_PER_SECOND", 10.0, 0.1, 1000
        ),
        max_sockets_per_user=r.integer(
            env.get("LISTENERS_WS_MAX_SOCKETS_PER_USER"), "LISTENERS_WS_MAX_SOCKETS_PER_USER", 10, 1, 1000
        ),
        max_sockets=r.integer(
            env.get("LISTENERS_WS_MAX_SOCKETS"), "LISTENERS_WS_MAX_SOCKETS", 10_000, 1, 1_000_000
        ),
        queue_length=r.integer(
            env.get("LISTENERS_WS_QUEUE_LENGTH"), "LISTENERS_WS_QUEUE_LENGTH", 1_000, 1, 1_000_000
        ),
        queue_bytes=r.integer(
            env.get("LISTENERS_WS_QUEUE_BYTES"), "LISTENERS_WS_QUEUE_BYTES", 262_144, 1_024, 1 << 30
        ),
        presence=r.boolean(env.get("LISTENERS_WS_PRESENCE"), "LISTENERS_WS_PRESENCE", False),
        max_unauthenticated_sockets=r.integer(
            env.get("LISTENERS_WS_MAX_UNAUTHENTICATED_SOCKETS"),
            "LISTENERS_WS_MAX_UNAUTHENTICATED_SOCKETS",
            default.max_unauthenticated_sockets,
            1,
            1_000_000,
        ),
        unauthenticated_timeout_seconds=r.number(
            env.get("LISTENERS_WS_UNAUTHENTICATED_TIMEOUT_SECONDS"),
            "LISTENERS_WS_UNAUTHENTICATED_TIMEOUT_SECONDS",
            default.unauthenticated_timeout_seconds,
            0.1,
            120,
        ),
        max_threads_per_user=r.integer(
            env.get("LISTENERS_WS_MAX_THREADS_PER_USER"),
            "LISTENERS_WS_MAX_THREADS_PER_USER",
            default.max_threads_per_user,
            1,
            1_000,
        ),
        chat_subscribes_per_second=r.number(
            env.get("LISTENERS_WS_CHAT_SUBSCRIBES_PER_SECOND"),
            "LISTENERS_WS_CHAT_SUBSCRIBES_PER_SECOND",
            default.chat_subscribes_per_second,
            0.1,
            100,
        ),
        max_event_bytes=r.integer(
            env.get("LISTENERS_WS_MAX_EVENT_BYTES"),
            "LISTENERS_WS_MAX_EVENT_BYTES",
            default.max_event_bytes,
            1_024,
            64 * 1024 * 1024,
        ),
        admin_token=admin,
    )


LOOPBACK_ONLY = "http:// only on loopback: 127.0.0.0/8, ::1, localhost"


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


def _secret(value: Any) -> Secret | None:
    return Secret(str(value)) if value not in (None, "") else None


_ADMIN_KEYS = ("type", "project_id", "private_key", "client_email", "token_uri")


def _firebase(r: _Reader, raw: str | None, emulator: str, project_env: str) -> FirebaseSettings:
    if raw is None:
        if not emulator:
            r.problems.append(
                "FIREBASE_ADMIN_JSON / secret firebase_admin: missing"
                " (required without FIRESTORE_EMULATOR_HOST)"
            )
        elif not project_env:
            r.problems.append(
                "FIREBASE_PROJECT_ID: missing (needed with the emulator when no admin JSON is given)"
            )
        return FirebaseSettings(project_id=project_env, emulator_host=emulator)
    try:
        info = json.loads(raw)
    except ValueError:
        r.problems.append("FIREBASE_ADMIN_JSON / secret firebase_admin: is not valid JSON")
        return FirebaseSettings(project_id=project_env, emulator_host=emulator)
    if not isinstance(info, dict):
        r.problems.append("FIREBASE_ADMIN_JSON / secret firebase_admin: must be a JSON object")
        return FirebaseSettings(project_id=project_env, emulator_host=emulator)
    missing = [k for k in _ADMIN_KEYS if not isinstance(info.get(k), str) or not info.get(k)]
    if missing:
        r.problems.append(f"FIREBASE_ADMIN_JSON / secret firebase_admin: missing {', '.join(missing)}")
    elif info["type"] != "service_account":
        r.problems.append("FIREBASE_ADMIN_JSON / secret firebase_admin: type must be service_account")
    project = str(info.get("project_id") or project_env)
    return FirebaseSettings(project_id=project, admin_json=Secret(raw), emulator_host=emulator)
