"""Least privilege in Redis: the ACL users of deploy/redis-acl.json, on a real redis-server.

The access strings live in one place, deploy/redis-acl.json; the CloudFormation template carries
them verbatim (checked here) and the tests below apply them with `ACL SETUSER` to a fresh user,
as ElastiCache's CreateUser does, with the `default` user switched off as in the template's user
group. Then: what each user may and may not do, and the whole service running under its own
user while the Reflex backend's user subscribes to the events and asks for resyncs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

from listeners.cluster import CHANGES_CHANNEL, MEMBERS_KEY, entry_id
from listeners.config import REDIS_SECRET, ConfigError, RedisSettings, Secret, load_redis_settings
from listeners_bridge import Bridge
from listeners_bridge.connection import redis_client
from listeners_bridge.resync import resync_request
from listeners_testkit.processes import FirestoreEmulator, RedisServer, free_port, wait_for_port
from tests.conftest import CONTROL_TOKEN, Consumer, Firebase
from tests.test_deploy import cfn

ROOT = Path(__file__).resolve().parents[1]
ACL_FILE = ROOT / "deploy" / "redis-acl.json"
INFRA = ROOT / "deploy" / "cloudformation" / "infra.yaml"
USERS: dict[str, dict[str, str]] = json.loads(ACL_FILE.read_text())["users"]
TEMPLATE_USERS = {"service": "RedisServiceUser", "backend": "RedisBackendUser", "default": "RedisDefaultUser"}
PASSWORDS = {"service": "service-password-0123456789abcdef", "backend": "backend-password-0123456789abcdef"}
BOOT = "boot-password-0123456789"  # the default user's, until the users are set up
ADMIN = ("acl-admin", "admin-password-0123456789")  # stands for ElastiCache's control plane


def acl_rules(access_string: str) -> list[str]:
    """`ACL SETUSER`'s arguments: one per rule, a selector `( … )` being one rule."""
    return re.findall(r"\([^)]*\)|\S+", access_string)


@pytest.fixture(scope="module")
def acl_redis() -> Iterator[RedisServer]:
    with RedisServer(password=BOOT) as server:
        boot = redis.Redis(host="127.0.0.1", port=server.port, password=BOOT)
        name, password = ADMIN
        boot.execute_command("ACL", "SETUSER", name, "reset", "on", f">{password}", "~*", "&*", "+@all")
        for role, user in USERS.items():  # `default` last: this connection is its
            secret = [f">{PASSWORDS[role]}"] if role in PASSWORDS else []
            rules = acl_rules(user["access_string"])
            boot.execute_command("ACL", "SETUSER", user["user_name"], "reset", *secret, *rules)
        boot.close()
        yield server


def settings_for(server: RedisServer, role: str) -> RedisSettings:
    return RedisSettings(
        host="127.0.0.1",
        port=server.port,
        username=USERS[role]["user_name"],
        password=Secret(PASSWORDS[role]),
        control_token=Secret(CONTROL_TOKEN),
    )


@pytest.fixture
async def admin(acl_redis: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis(host="127.0.0.1", port=acl_redis.port, username=ADMIN[0], password=ADMIN[1])
    yield client
    await client.aclose()


@pytest.fixture
async def service(acl_redis: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = redis_client(settings_for(acl_redis, "service"))
    yield client
    await client.aclose()


@pytest.fixture
async def backend(acl_redis: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = redis_client(settings_for(acl_redis, "backend"))
    yield client
    await client.aclose()


async def subscribed(client: aioredis.Redis, *channels: str) -> Any:
    """A pub/sub of `client` on these exact channels, once Redis has confirmed each of them
    (a refusal raises NoPermissionError)."""
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe(*channels)
        confirmed: set[bytes] = set()
        async with asyncio.timeout(10):
            while len(confirmed) < len(channels):
                message = await pubsub.get_message(timeout=1.0)
                if message is not None and message["type"] == "subscribe":
                    confirmed.add(message["channel"])
    except BaseException:
        await pubsub.aclose()
        raise
    return pubsub


async def refused(client: aioredis.Redis, *channels: str) -> bool:
    try:
        pubsub = await subscribed(client, *channels)
    except NoPermissionError:
        return True
    await pubsub.aclose()
    return False


# ------------------------------------------------------------------ one source of truth


def test_the_template_carries_the_access_strings_of_redis_acl_json() -> None:
    resources = cfn(INFRA)["Resources"]
    for role, logical_id in TEMPLATE_USERS.items():
        user = resources[logical_id]
        assert user["Type"] == "AWS::ElastiCache::User"
        assert user["Properties"]["AccessString"] == USERS[role]["access_string"], role
        assert user["Properties"]["UserName"] == USERS[role]["user_name"], role
    group = resources["RedisUserGroup"]
    assert group["Type"] == "AWS::ElastiCache::UserGroup"
    assert sorted(map(json.dumps, group["Properties"]["UserIds"])) == sorted(
        json.dumps({"Ref": logical_id}) for logical_id in TEMPLATE_USERS.values()
    )
    redis_group = resources["Redis"]["Properties"]
    assert redis_group["UserGroupIds"] == [{"Ref": "RedisUserGroup"}]
    assert "AuthToken" not in redis_group  # RBAC replaces the one shared token


def test_the_access_strings_name_the_channels_and_keys_the_code_uses() -> None:
    defaults = RedisSettings(host="unused")
    service = USERS["service"]["access_string"].split()
    for rule in (
        f"&{defaults.channel_prefix}*",
        f"&{defaults.chat_channel_prefix}*",
        f"&{defaults.control_channel}",
        f"&{CHANGES_CHANNEL}",
        "&listeners:hub:*",  # Direct mode's hub: its own connection's home channel
        "&listeners:smoke:*",  # `listeners smoke --redis`, run as the service (docs/deploy.md)
        f"~{MEMBERS_KEY}",
    ):
        assert rule in service, rule
    backend = USERS["backend"]["access_string"]
    assert f"&{defaults.control_channel} -@all +publish +ping (" in backend
    assert f"&{defaults.channel_prefix}* &{defaults.chat_channel_prefix}* +subscribe +unsubscribe)" in backend
    assert USERS["default"]["user_name"] == "default" and USERS["default"]["access_string"].startswith("off ")
    for user in USERS.values():  # ElastiCache sets passwords through its API, never in the string
        assert not re.search(r"(^|\s)[>#<!]|nopass|allkeys|allchannels|~\*|&\*|\+@all", user["access_string"])


# ------------------------------------------------------------------ the client and its settings


async def test_redis_client_authenticates_as_its_user_and_runs_nothing_else_on_connect() -> None:
    """AUTH with the user name, then the caller's commands: no CLIENT SETINFO, which neither
    ACL user may run (every connection would leave a refusal in the ACL log)."""
    commands: list[list[str]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            args = []
            for _ in range(int(line[1:])):
                size = int((await reader.readline())[1:])
                args.append((await reader.readexactly(size + 2))[:-2].decode())
            commands.append(args)
            if args[0].upper() == "HELLO":  # redis-py 8 speaks RESP3: HELLO 3 AUTH user password
                writer.write(b"%1\r\n$5\r\nproto\r\n:3\r\n")
            else:
                writer.write(b"+PONG\r\n" if args[0].upper() == "PING" else b"+OK\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = RedisSettings(
        host="127.0.0.1", port=port, username="listeners-service", password=Secret("pw-1")
    )
    client = redis_client(settings)
    try:
        assert await client.ping()
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()
    (login, *rest) = commands
    assert login[0] in ("AUTH", "HELLO") and login[-3:] == ["AUTH", "listeners-service", "pw-1"]
    assert rest == [["PING"]]


def read_redis_secret(payload: dict[str, Any]) -> Any:
    return lambda name: json.dumps(payload) if name == REDIS_SECRET else None


def test_username_comes_from_the_redis_secret_then_the_environment() -> None:
    env = {
        "GOOGLE_PROJECT_ID": "p",
        "LISTENERS_REDIS_USERNAME": "from-env",
        "LISTENERS_REDIS_PASSWORD": "pw-env",
    }
    secret = {"host": "h", "username": "listeners-reflex", "password": "pw-from-the-secret"}
    settings = load_redis_settings(env, read_secret=read_redis_secret(secret))
    assert (settings.username, settings.password) == ("listeners-reflex", Secret("pw-from-the-secret"))
    settings = load_redis_settings(env, read_secret=read_redis_secret({"host": "h"}))
    assert (settings.username, settings.password) == ("from-env", Secret("pw-env"))
    assert load_redis_settings({"LISTENERS_REDIS_HOST": "h"}).username == ""  # the default user
    # A user name is not a secret: shown as is (the password is not).
    assert "listeners-reflex" in repr(load_redis_settings(env, read_secret=read_redis_secret(secret)))
    assert "pw-from-the-secret" not in repr(load_redis_settings(env, read_secret=read_redis_secret(secret)))


def test_a_username_that_is_not_a_string_is_named_like_the_other_redis_keys() -> None:
    with pytest.raises(ConfigError) as error:
        load_redis_settings(
            {"GOOGLE_PROJECT_ID": "p"}, read_secret=read_redis_secret({"host": "h", "username": []})
        )
    assert error.value.problems == ["LISTENERS_REDIS_USERNAME / redis.username: must be a string"]


# ------------------------------------------------------------------ what each user may do


async def test_the_backend_subscribes_to_events_and_publishes_only_resync_requests(
    acl_redis: RedisServer, admin: aioredis.Redis, backend: aioredis.Redis
) -> None:
    pubsub = await subscribed(backend, "user:x", "chat:x:acme:t1")
    try:
        assert await admin.publish("user:x", "event") == 1
        async with asyncio.timeout(10):
            while (message := await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)) is None:
                pass
        assert (message["channel"], message["data"]) == (b"user:x", b"event")
    finally:
        await pubsub.aclose()
    assert await backend.publish("listeners:control", resync_request(CONTROL_TOKEN, "x")) == 0
    # It cannot forge events, nor listen to the other consumers' resync requests.
    for channel in ("user:x", "chat:x:acme:t1", "listeners:members:changes", "elsewhere"):
        with pytest.raises(NoPermissionError):
            await backend.publish(channel, "forged")
    for channels in (("listeners:control",), ("listeners:members:changes",), ("user:x", "elsewhere")):
        assert await refused(backend, *channels), channels
    denied = [
        ("PSUBSCRIBE", "user:*"),  # exact SUBSCRIBE only
        ("PUBSUB", "CHANNELS"),  # would list who is online
        ("ZRANGE", MEMBERS_KEY, "0", "-1"),
        ("GET", "anything"),
        ("KEYS", "*"),
        ("FLUSHALL",),
        ("CONFIG", "GET", "*"),
        ("ACL", "LIST"),
        ("CLIENT", "LIST"),
    ]
    for command in denied:
        with pytest.raises(NoPermissionError):
            await backend.execute_command(*command)
    assert await backend.ping()  # the heartbeat of its pub/sub connection


async def test_the_service_runs_what_it_needs_and_nothing_else(
    acl_redis: RedisServer, admin: aioredis.Redis, service: aioredis.Redis
) -> None:
    assert await service.ping()
    seconds, _ = await service.time()
    assert seconds > 0
    await service.zadd(MEMBERS_KEY, {"probe": seconds + 60})
    await service.zremrangebyscore(MEMBERS_KEY, "-inf", seconds - 60)
    assert b"probe" in await service.zrange(MEMBERS_KEY, 0, -1)
    assert await service.zrem(MEMBERS_KEY, "probe") == 1
    for channel in ("user:x", "chat:x:acme:t1", "listeners:control", CHANGES_CHANNEL, "listeners:smoke:1"):
        assert await service.publish(channel, "ok") == 0
    channels = ("listeners:hub:i-1", "user:x", "chat:x:acme:t1", "listeners:control", CHANGES_CHANNEL)
    pubsub = await subscribed(service, *channels)
    await pubsub.unsubscribe("user:x")
    await pubsub.aclose()

    for channel in ("elsewhere", "users:x", "listeners:other"):
        with pytest.raises(NoPermissionError):
            await service.publish(channel, "no")
        assert await refused(service, channel), channel
    await admin.set("someone:else", "data")
    denied = [
        ("FLUSHALL",),
        ("FLUSHDB",),
        ("CONFIG", "GET", "*"),
        ("CONFIG", "SET", "maxmemory", "1"),
        ("KEYS", "*"),
        ("SCAN", "0"),
        ("GET", "someone:else"),
        ("DEL", "someone:else"),
        ("SET", MEMBERS_KEY, "x"),  # its own key, but not with a command it does not use
        ("DEL", MEMBERS_KEY),
        ("ZADD", "someone:set", "1", "m"),  # its own commands, but not on another key
        ("ZRANGE", "someone:else", "0", "-1"),
        ("EVAL", "return 1", "0"),
        ("PSUBSCRIBE", "user:*"),
        ("PUBSUB", "CHANNELS"),
        ("SELECT", "1"),
        ("ACL", "LIST"),
        ("ACL", "SETUSER", "intruder", "on", ">pw-0123456789abcdef", "+@all"),
        ("CLIENT", "LIST"),
        ("CLIENT", "KILL", "ID", "1"),
        ("INFO",),
        ("REPLICAOF", "NO", "ONE"),
    ]
    for command in denied:
        with pytest.raises(NoPermissionError):
            await service.execute_command(*command)
    assert await admin.get("someone:else") == b"data"


async def test_the_default_user_is_off(acl_redis: RedisServer) -> None:
    anonymous = aioredis.Redis(host="127.0.0.1", port=acl_redis.port)
    with pytest.raises((AuthenticationError, ResponseError)):  # NOAUTH: nobody is logged in
        await anonymous.ping()
    await anonymous.aclose()
    as_default = aioredis.Redis(host="127.0.0.1", port=acl_redis.port, username="default", password=BOOT)
    with pytest.raises(AuthenticationError):  # WRONGPASS: its password is gone and it is off
        await as_default.ping()
    await as_default.aclose()


# ------------------------------------------------------------------ the service under its own user


def start_service(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    """`uvicorn app.main:app`, as the container runs it, with only this environment's settings."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LISTENERS_", "FIREBASE", "FIRESTORE", "GOOGLE_"))
    }
    with log.open("wb") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env={**clean, **env},
            stdout=output,
            stderr=subprocess.STDOUT,
        )


async def refusals(admin: aioredis.Redis) -> list[dict[str, Any]]:
    """The ACL log's entries for the service's and the backend's users."""
    names = {USERS["service"]["user_name"], USERS["backend"]["user_name"]}
    return [e for e in await admin.acl_log() if str(e.get("username")) in names]


@pytest.mark.timeout(480)
async def test_the_service_runs_under_its_own_user_and_answers_the_backends_user(
    acl_redis: RedisServer,
    admin: aioredis.Redis,
    backend: aioredis.Redis,
    emulator: FirestoreEmulator,
    project_id: str,
    fb: Firebase,
    tmp_path: Path,
) -> None:
    await admin.acl_log_reset()
    uid = f"acl-{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = {
        "LISTENERS_REDIS_HOST": "127.0.0.1",
        "LISTENERS_REDIS_PORT": str(acl_redis.port),
        "LISTENERS_REDIS_USERNAME": USERS["service"]["user_name"],
        "LISTENERS_REDIS_PASSWORD": PASSWORDS["service"],
        "LISTENERS_CONTROL_TOKEN": CONTROL_TOKEN,
        "LISTENERS_INSTANCE_ID": "acl-test",
        "LISTENERS_SWEEP_INTERVAL_SECONDS": "0.2",
        "FIRESTORE_EMULATOR_HOST": emulator.host,
        "FIREBASE_PROJECT_ID": project_id,
    }
    log = tmp_path / "service.log"
    process = start_service(env, port, log)
    consumer = Consumer(backend, [f"user:{uid}"])  # the Reflex backend's user, exact SUBSCRIBE
    try:
        await asyncio.to_thread(wait_for_port, port, 120, None)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            deadline = time.monotonic() + 120
            while (await http.get("/healthz")).json().get("redis") != "ok":
                assert time.monotonic() < deadline, "the service never reached Redis as its own user"
                await asyncio.sleep(0.2)
        async with asyncio.timeout(120):  # the membership heartbeat: TIME, ZADD … on its own key
            while "acl-test" not in {
                entry_id(m.decode()) for m in cast(list[bytes], await admin.zrange(MEMBERS_KEY, 0, -1))
            }:
                await asyncio.sleep(0.2)

        # A user comes online: the service publishes on user:{uid}, the backend's user receives.
        await consumer.start()
        await fb.notification(uid, "n1", collection_id="c1")
        await fb.online(uid, companies=["c1"])

        def synced_with_n1(events: list[dict[str, Any]]) -> bool:
            return any(
                e["type"] == "notif.sync" and [i["doc_id"] for i in e["payload"]["notifications"]] == ["n1"]
                for e in events
            )

        await consumer.wait_for(synced_with_n1, timeout=120)

        # A signed resync request from the backend's user is heard and answered.
        since = consumer.mark()
        heard = await backend.publish("listeners:control", resync_request(CONTROL_TOKEN, uid))
        assert heard >= 1  # the service's control listener is subscribed as the service's user
        await consumer.wait_for(lambda events: synced_with_n1(events[since:]), timeout=60)

        # The bridge library itself, under the backend's user: subscribe, ask, receive the sync.
        bridge = Bridge(settings_for(acl_redis, "backend"))
        generator = cast(AsyncGenerator[dict[str, Any], None], bridge.events(uid))
        async with asyncio.timeout(60), contextlib.aclosing(generator) as events:
            async for event in events:
                if event["type"] == "notif.sync":
                    break
        assert await refusals(admin) == []
    finally:
        await consumer.stop()
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(process.wait, 60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        print(log.read_text()[-6000:])  # shown when the test fails
    output = log.read_text()
    assert process.returncode in (0, -signal.SIGTERM), output[-2000:]
    # Nothing the service did, starting, serving and leaving, was refused by Redis.
    assert await refusals(admin) == [], output[-2000:]
    if "could not leave cleanly" not in output:  # (a slow machine may time that out)
        assert b"acl-test" not in await admin.zrange(MEMBERS_KEY, 0, -1)  # it left: ZREM, PUBLISH
    assert "NoPermissionError" not in output and "NOPERM" not in output
    assert PASSWORDS["service"] not in output
