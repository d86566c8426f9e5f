"""The README's first command: the embedded default runs and events reach Redis."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from listeners.local.processes import RedisServer, free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.asyncio
async def test_demo_brings_users_online_and_publishes(redis_server: RedisServer) -> None:
    client = aioredis.Redis(port=redis_server.port)
    pubsub = client.pubsub()
    await pubsub.subscribe("user:demo-alice", "user:demo-bob", "user:demo-carol")
    env = {**os.environ, "LISTENERS_REDIS_HOST": "127.0.0.1", "LISTENERS_REDIS_PORT": str(redis_server.port)}
    env.pop("FIRESTORE_EMULATOR_HOST", None)
    demo = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "listeners.local.demo",
        "--port",
        str(free_port()),
        "--duration",
        "6",
        "--interval",
        "0.3",
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    types: list[str] = []
    try:
        async with asyncio.timeout(60):
            while not {"notif.sync", "notif.add", "msg.sync", "msg.add"} <= set(types):
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message:
                    types.append(json.loads(message["data"])["type"])
        output, _ = await asyncio.wait_for(demo.communicate(), 60)
    finally:
        if demo.returncode is None:
            demo.kill()
        await pubsub.aclose()
        await client.aclose()
    assert demo.returncode == 0
    text = output.decode()
    assert "redis-cli" in text and "/healthz" in text
