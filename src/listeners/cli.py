"""Operator commands (docs/deploy.md):

    listeners config check                        validate the configuration without starting
    listeners secrets push --redis redis.json …   create or update the Secret Manager secrets
    listeners smoke --url https://… [--token …] [--redis]
                                                  healthz, /ws up to auth.ok, a Redis round trip

`config check` reads the configuration exactly as the service does (Secret Manager when
GOOGLE_PROJECT_ID is set, then the environment) and exits 2 with every problem, like the
service. `secrets push` checks the files with those same rules before it writes anything, and
adds a version only when the content changed. `smoke` exits 1 when any check fails. No command
prints a secret value.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlencode, urlsplit

import httpx

from listeners.config import (
    FIREBASE_SECRET,
    REDIS_SECRET,
    SERVICE_SECRET,
    ConfigError,
    RedisSettings,
    Settings,
    load_redis_settings,
    load_settings,
)

# ---------------------------------------------------------------- config check


def describe(settings: Settings) -> list[str]:
    """What the service would run with; secrets only as set / not set."""
    redis, firebase, service = settings.redis, settings.firebase, settings.service
    source = f"project {settings.google_project_id}" if settings.google_project_id else "not used"
    return [
        "configuration ok",
        f"  secret manager: {source}",
        f"  redis: {redis.host}:{redis.port} db={redis.db} tls={'on' if redis.tls else 'off'}"
        f" user={redis.username or '-'} password={'set' if redis.password else 'not set'}"
        f" channel_prefix={redis.channel_prefix!r}",
        f"  firestore: project {firebase.project_id}"
        + (f", emulator {firebase.emulator_host}" if firebase.emulator_host else ", service account"),
        f"  websocket: path {service.alb_ws_path}, allowed origins {list(service.allowed_origins) or '-'}",
        f"  log level {settings.log_level}, instance {settings.instance_id}",
    ]


def config_check(env: Mapping[str, str] | None = None) -> int:
    try:
        settings = load_settings(env)
    except ConfigError as exc:
        print("invalid configuration:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    print("\n".join(describe(settings)))
    return 0


# ---------------------------------------------------------------- secrets push

KINDS = {  # kind -> (command-line option, environment override of the name, default name)
    "redis": ("--redis", "LISTENERS_REDIS_SECRET", REDIS_SECRET),
    "firebase_admin": ("--firebase-admin", "LISTENERS_FIREBASE_SECRET", FIREBASE_SECRET),
    "service_config": ("--service-config", "LISTENERS_SERVICE_SECRET", SERVICE_SECRET),
}


class SecretClient(Protocol):
    """The part of google.cloud.secretmanager.SecretManagerServiceClient that push uses."""

    def get_secret(self, *, request: dict[str, Any]) -> Any: ...
    def create_secret(self, *, request: dict[str, Any]) -> Any: ...
    def add_secret_version(self, *, request: dict[str, Any]) -> Any: ...
    def access_secret_version(self, *, request: dict[str, Any]) -> Any: ...


def validate_payloads(payloads: Mapping[str, Any]) -> list[str]:
    """The service's own rules (`load_settings`) applied to the files as if read from Secret
    Manager; what no file gives is filled with placeholders that pass."""
    names = {FIREBASE_SECRET: "firebase_admin", SERVICE_SECRET: "service_config"}
    env = {"GOOGLE_PROJECT_ID": "validation", "AWS_REGION_NAME": "validation"}
    if "redis" not in payloads:
        env["LISTENERS_REDIS_HOST"] = "placeholder"
    if "firebase_admin" not in payloads:
        env.update(FIRESTORE_EMULATOR_HOST="placeholder:8080", FIREBASE_PROJECT_ID="placeholder")

    def read(name: str) -> str | None:
        if name == REDIS_SECRET:
            return json.dumps(payloads.get("redis", {}))
        kind = names.get(name, "")
        return json.dumps(payloads[kind]) if kind in payloads else None

    try:
        load_settings(env, read_secret=read)
    except ConfigError as exc:
        # ca_file names a path inside the container, which this machine need not have.
        return [p for p in exc.problems if not p.startswith("LISTENERS_REDIS_CA_FILE: no such file")]
    return []


def secret_path(project: str, name: str) -> tuple[str, str, str]:
    """(project, secret id, secret resource name) for a name as the service reads it."""
    if name.startswith("projects/"):
        parts = name.split("/")
        project, sid = parts[1], parts[3]
    else:
        sid = name.replace("/", "-")  # as listeners.secret_manager.secret_id
    return project, sid, f"projects/{project}/secrets/{sid}"


def _latest(client: SecretClient, path: str) -> bytes | None:
    from google.api_core.exceptions import FailedPrecondition, NotFound

    try:
        response = client.access_secret_version(request={"name": f"{path}/versions/latest"})
    except (NotFound, FailedPrecondition):  # no version yet, or the latest one disabled
        return None
    return bytes(response.payload.data)


def push(client: SecretClient, project: str, items: Sequence[tuple[str, bytes]]) -> None:
    from google.api_core.exceptions import NotFound

    for name, data in items:
        owner, sid, path = secret_path(project, name)
        try:
            client.get_secret(request={"name": path})
            created = False
        except NotFound:
            client.create_secret(
                request={
                    "parent": f"projects/{owner}",
                    "secret_id": sid,
                    "secret": {"replication": {"automatic": {}}, "labels": {"app": "listeners"}},
                }
            )
            created = True
        if not created and _latest(client, path) == data:
            print(f"{name}: unchanged ({path})")
            continue
        version = client.add_secret_version(request={"parent": path, "payload": {"data": data}})
        action = "created" if created else "updated"
        print(f"{name}: {action} ({version.name})")


def secrets_push(
    args: argparse.Namespace,
    env: Mapping[str, str] | None = None,
    make_client: Callable[[], SecretClient] | None = None,
) -> int:
    env = os.environ if env is None else env
    project = args.project or env.get("GOOGLE_PROJECT_ID", "")
    problems: list[str] = [] if project else ["--project or GOOGLE_PROJECT_ID: missing"]
    payloads: dict[str, Any] = {}
    items: list[tuple[str, bytes]] = []
    files = [
        (kind, env.get(variable) or default, getattr(args, kind))
        for kind, (_, variable, default) in KINDS.items()
    ]
    for spec in args.aws_secret or []:
        name, _, file = spec.partition("=")
        files.append(("aws", name, Path(file) if name and file else None))
        if not (name and file):
            problems.append(f"--aws-secret {spec}: expected NAME=FILE")
    for kind, name, file in files:
        if file is None:
            continue
        try:
            payload = json.loads(Path(file).read_text())
        except (OSError, ValueError) as exc:
            problems.append(f"{file}: {type(exc).__name__}: {exc}")
            continue
        if not isinstance(payload, dict):
            problems.append(f"{file}: must be a JSON object")
            continue
        if kind != "aws":
            payloads[kind] = payload
        items.append((name, (json.dumps(payload, indent=2, ensure_ascii=False) + "\n").encode()))
    if not items and not problems:
        problems.append("nothing to push: give --redis, --firebase-admin, --service-config or --aws-secret")
    problems += validate_payloads(payloads) if payloads else []
    if problems:
        print("not pushed, invalid secrets:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    if args.dry_run:
        for name, _ in items:
            print(f"{name}: valid (dry run, not pushed)")
        return 0
    from google.api_core.exceptions import GoogleAPIError
    from google.auth.exceptions import GoogleAuthError

    try:
        push(make_client() if make_client else _secret_manager_client(), project, items)
    except (GoogleAPIError, GoogleAuthError) as exc:  # credentials, permission, quota
        print(f"push failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


def _secret_manager_client() -> SecretClient:
    from google.cloud import secretmanager

    client: SecretClient = secretmanager.SecretManagerServiceClient()
    return client


# ---------------------------------------------------------------- smoke


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


async def check_healthz(base: str, timeout: float) -> Check:
    url = base.rstrip("/") + "/healthz"
    try:
        async with httpx.AsyncClient(timeout=timeout) as client:
            response = await client.get(url)
    except httpx.HTTPError as exc:
        return Check("healthz", False, f"{url}: {type(exc).__name__}: {exc}")
    try:
        body = response.json()
    except ValueError:
        body = None
    body = body if isinstance(body, dict) else {}
    status = body.get("status")
    fields = " ".join(
        f"{k}={body[k]}" for k in ("status", "version", "listeners_count", "redis") if k in body
    )
    if response.status_code == 200 and status == "ok":
        return Check("healthz", True, f"200 {fields}")
    if response.status_code == 200:
        return Check("healthz", False, f"200 but not ok: {fields} (see the service's logs)")
    return Check("healthz", False, f"HTTP {response.status_code} {fields}".rstrip())


def websocket_url(base: str, path: str, token: str, token_in: str) -> str:
    parts = urlsplit(base)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    url = f"{scheme}://{parts.netloc}{path}"
    return f"{url}?{urlencode({'token': token})}" if token_in == "query" else url


_WS_HINTS = {
    404: "no WebSocket endpoint at this path",
    403: "the Origin was refused (service_config allowed_origins)",
}


async def check_websocket(
    base: str, path: str, token: str, token_in: str, origin: str, timeout: float, wait: float
) -> Check:
    """Opens the socket as a browser would (docs/websocket.md) and waits for `auth.ok`: the
    service accepts the upgrade, then verifies the token and closes with 4001-4010 if it is
    refused."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
    from websockets.typing import Origin, Subprotocol

    url = websocket_url(base, path, token, token_in)
    shown = url.replace(urlencode({"token": token}), "token=***")
    subprotocols = [Subprotocol("bearer"), Subprotocol(token)] if token_in == "protocol" else None
    try:
        async with connect(
            url,
            origin=Origin(origin) if origin else None,
            subprotocols=subprotocols,
            open_timeout=timeout,
            close_timeout=timeout,
        ) as ws:
            try:
                async with asyncio.timeout(wait):
                    message = await ws.recv()
            except TimeoutError:
                return Check("websocket", False, f"{shown}: connected, but no auth.ok within {wait:g} s")
            except ConnectionClosed as exc:
                code, reason = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (1006, "no close frame")
                refused = "token refused: " if 4001 <= code <= 4010 else ""
                return Check("websocket", False, f"{shown}: {refused}closed with {code} {reason}".rstrip())
            first = _json_object(message)
            if first.get("type") != "auth.ok":
                return Check(
                    "websocket", False, f"{shown}: first message is not auth.ok: {first.get('type')!r}"
                )
            protocol = f", subprotocol {ws.subprotocol}" if ws.subprotocol else ""
            return Check("websocket", True, f"{shown}: auth.ok for uid {first.get('uid')!r}{protocol}")
    except InvalidStatus as exc:
        code = exc.response.status_code
        return Check("websocket", False, f"{shown}: HTTP {code}: {_WS_HINTS.get(code, 'upgrade refused')}")
    except (WebSocketException, OSError, TimeoutError) as exc:
        return Check("websocket", False, f"{shown}: {type(exc).__name__}: {exc}")


def _json_object(message: str | bytes) -> dict[str, Any]:
    try:
        data = json.loads(message)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


async def check_redis(settings: RedisSettings, timeout: float) -> Check:
    """SUBSCRIBE a fresh channel, PUBLISH to it, receive it back: AUTH, TLS (certificate and host
    name verified, as the service does) and Pub/Sub in one go."""
    from redis.exceptions import RedisError

    from listeners.publish.connection import close_quietly, redis_client

    tls = "TLS, certificate verified" if settings.tls else "no TLS"
    mode = f"{tls}, {'AUTH' if settings.password else 'no AUTH'}"
    where = f"{settings.host}:{settings.port}"
    client = redis_client(settings, timeout=timeout)
    pubsub = client.pubsub()
    channel = f"listeners:smoke:{uuid.uuid4().hex}"
    body = uuid.uuid4().hex
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            await pubsub.subscribe(channel)
            await _next_message(pubsub, "subscribe")
            receivers = await client.publish(channel, body)
            message = await _next_message(pubsub, "message")
        if message.get("data") != body.encode():
            return Check("redis", False, f"{where}: received something else on {channel}")
        ms = (time.monotonic() - started) * 1000
        return Check("redis", True, f"{where}: round trip in {ms:.0f} ms, {receivers} receiver ({mode})")
    except TimeoutError:
        return Check("redis", False, f"{where}: no answer within {timeout:g} s ({mode})")
    except (RedisError, OSError) as exc:
        cause = exc.__cause__ or exc.__context__
        if isinstance(exc, ssl.SSLError) or isinstance(cause, ssl.SSLError) or "CERTIFICATE" in str(exc):
            return Check("redis", False, f"{where}: TLS verification failed: {exc}")
        return Check("redis", False, f"{where}: {type(exc).__name__}: {exc} ({mode})")
    finally:
        await close_quietly(pubsub, client)


async def _next_message(pubsub: Any, kind: str) -> dict[str, Any]:
    while True:
        message = await pubsub.get_message(timeout=0.5)
        if message is not None and message.get("type") == kind:
            return dict(message)


async def smoke_checks(args: argparse.Namespace, env: Mapping[str, str]) -> list[Check]:
    checks: list[Check] = []
    if args.url:
        checks.append(await check_healthz(args.url, args.timeout))
    token = args.token or env.get("LISTENERS_SMOKE_TOKEN", "")
    if token:
        checks.append(
            await check_websocket(
                args.url, args.ws_path, token, args.token_in, args.origin, args.timeout, args.ws_wait
            )
        )
    if args.redis:
        try:
            settings = load_redis_settings(env)
        except ConfigError as exc:
            checks.append(Check("redis", False, f"configuration: {'; '.join(exc.problems)}"))
        else:
            checks.append(await check_redis(settings, args.timeout))
    return checks


def smoke(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    if not args.url and not args.redis:
        print("smoke: give --url, --redis or both", file=sys.stderr)
        return 2
    if (args.token or env.get("LISTENERS_SMOKE_TOKEN")) and not args.url:
        print("smoke: the WebSocket check needs --url", file=sys.stderr)
        return 2
    checks = asyncio.run(smoke_checks(args, env))
    for check in checks:
        print(f"{'PASS' if check.ok else 'FAIL'}  {check.name:<9} {check.detail}")
    failed = sum(not c.ok for c in checks)
    print(f"smoke: {'all checks ok' if not failed else f'{failed} of {len(checks)} checks failed'}")
    return 1 if failed else 0


# ---------------------------------------------------------------- command line


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="listeners", description="listeners service: operator commands")
    commands = top.add_subparsers(dest="command", required=True)

    config = commands.add_parser("config", help="configuration").add_subparsers(dest="action", required=True)
    config.add_parser(
        "check", help="validate the configuration (Secret Manager, environment) without starting"
    )

    secrets = commands.add_parser("secrets", help="Google Secret Manager").add_subparsers(
        dest="action", required=True
    )
    push_ = secrets.add_parser("push", help="create or update the secrets from JSON files, validated first")
    push_.add_argument("--project", default="", help="GCP project (default: GOOGLE_PROJECT_ID)")
    for kind, (option, variable, default) in KINDS.items():
        push_.add_argument(option, dest=kind, type=Path, help=f"JSON for {default} (name: ${variable})")
    push_.add_argument(
        "--aws-secret",
        action="append",
        metavar="NAME=FILE",
        help="the AWS_SECRET_NAME secret (any JSON object)",
    )
    push_.add_argument("--dry-run", action="store_true", help="validate only")

    check = commands.add_parser("smoke", help="check a deployed service")
    check.add_argument("--url", default="", help="https://host of the ALB (healthz, WebSocket)")
    check.add_argument("--token", default="", help="Firebase ID token for /ws (or $LISTENERS_SMOKE_TOKEN)")
    check.add_argument("--token-in", choices=("query", "protocol"), default="query")
    check.add_argument("--ws-path", default="/ws")
    check.add_argument("--origin", default="", help="Origin header for the WebSocket handshake")
    check.add_argument("--ws-wait", type=float, default=5.0, help="seconds to wait for auth.ok")
    check.add_argument(
        "--redis",
        action="store_true",
        help="Redis round trip, configured as the service is (LISTENERS_REDIS_*, GSM)",
    )
    check.add_argument("--timeout", type=float, default=10.0)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "config":
        return config_check()
    if args.command == "secrets":
        return secrets_push(args)
    return smoke(args)


if __name__ == "__main__":
    sys.exit(main())
