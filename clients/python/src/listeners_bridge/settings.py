"""Settings declared as a table of keys, and the Redis settings every consumer shares.

Every key is declared once, on the settings field it fills, by `key(...)`: its environment
variable, its default, its meaning, and where relevant its secret key, range, choices or rule.
`table()` gathers them; one generic reader (`read_keys`) fills a settings class from them. The
service declares its own keys on `listeners.config.Settings`, which extends `ConsumerSettings`;
a consumer (the bridge) reads only these, with the same names, through `load_redis_settings`.

For each key the first of these that is set wins:
1. its key in its Secret Manager secret, read only when GOOGLE_PROJECT_ID is set;
2. the environment variable;
3. the default.
Every problem is collected, so one `ConfigError` names every missing or invalid key, never a
value. Values of secrets are wrapped in `Secret` so that no repr, log line or error shows them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from listeners_bridge import secret_manager
from listeners_bridge.secret_manager import SecretReader

REDIS_SECRET = "pinnokio/listeners/redis"
MUST_EXIST = ("redis", "aws")  # secrets that must exist once named; the others are optional


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


def existing_file(value: str) -> str:
    """an existing file"""
    return "" if os.path.isfile(value) else "no such file"


# ---------------------------------------------------------------- the keys a consumer reads
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
class RedisSecretNames:
    """Secret names"""

    # Each field is named after the secret it names: a key's secret "redis.host" is key `host`
    # of the secret named by the field `redis`; "firebase_admin", that whole secret.

    redis: str = key("LISTENERS_REDIS_SECRET", REDIS_SECRET, "must exist")


@dataclass(frozen=True, kw_only=True)
class ConsumerSettings:
    """The process, and Secret Manager"""

    redis: RedisSettings
    google_project_id: str = key("GOOGLE_PROJECT_ID", "", "the secrets' project; unset: no Secret Manager")
    google_service_account_secret: str = key("GOOGLE_SERVICE_ACCOUNT_SECRET", "",
        "a secret holding the service account that reads the others")
    google_credentials_json: Secret | None = key("GOOGLE_APPLICATION_CREDENTIALS_JSON", None,  # noqa: RUF009
        "service account for Secret Manager (ECS task `secrets`)")
    secrets: RedisSecretNames = field(default_factory=RedisSecretNames)


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


def table(root: type) -> tuple[Key, ...]:
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


def build(cls: type, values: Mapping[str, Any]) -> Any:
    """An instance of settings class `cls`, each field from its key's value."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if "key" in f.metadata:
            kwargs[f.name] = values[f.metadata["key"].env]
        elif dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = build(hints[f.name], values)
    return cls(**kwargs)


def load_redis_settings(
    env: Mapping[str, str] | None = None, read_secret: SecretReader | None = None
) -> RedisSettings:
    """The Redis keys alone, with the service's names, precedence and Secret Manager set-up."""
    values, problems = read_keys(table(ConsumerSettings), os.environ if env is None else env, read_secret)
    if problems:
        raise ConfigError(problems)
    redis: RedisSettings = build(RedisSettings, {name: v.value for name, v in values.items()})
    return redis
