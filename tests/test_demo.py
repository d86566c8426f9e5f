"""The README's first command: the embedded default runs and events reach Redis."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from listeners_testkit.processes import RedisServer, free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.asyncio
async def test_demo_brings_users_online_and_publishes(redis_server: RedisServer) -> None:
    client = aioredis.Redis(port=redis_server.port)
    pubsub = client.pubsub()
    await pubsub.subscribe("user:demo-alice", "user:demo-bob", "user:demo-carol")
    env = {**os.environ, "LISTENERS_REDIS_HOST": "127.0.0.1", "LISTENERS_REDIS_PORT": str(redis_server.port)}
    env.pop("FIRESTORE_EMULATOR_HOST", None)
    # No --duration: the demo writes until it is stopped, as the README's `bash scripts/demo`
    # does, so a slow start cannot end the writes before each kind of event was seen.
    demo = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "listeners_testkit.demo"),
        *("--port", str(free_port()), "--interval", "0.3"),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert demo.stdout is not None
    output = asyncio.create_task(demo.stdout.read())  # read all along: a full pipe would stall it
    types: list[str] = []
    try:
        async with asyncio.timeout(60):
            while not {"notif.sync", "notif.add", "msg.sync", "msg.add"} <= set(types):
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message:
                    types.append(json.loads(message["data"])["type"])
        demo.send_signal(signal.SIGTERM)  # a clean stop: users offline, its children stopped
        await asyncio.wait_for(demo.wait(), 60)
    finally:
        if demo.returncode is None:  # stopped cleanly if it can be, so that its children stop too
            demo.terminate()
            try:
                await asyncio.wait_for(demo.wait(), 60)
            except TimeoutError:
                demo.kill()
                await demo.wait()
        await pubsub.aclose()
        await client.aclose()
    text = (await asyncio.wait_for(output, 60)).decode()
    assert demo.returncode == 0, text[-2000:]
    assert "redis-cli" in text and "/healthz" in text
