"""Bytes published on Redis per notification change, before and after issue 14, in one run.

"Before" is the service with `LISTENERS_SYNC_EACH_CHANGE=true` (each change's deltas, then a
sync of the whole list: what every change cost before issue 14); "after" is the default
(the deltas alone). For each list length N, a user with N unread notifications is brought
online, then `--changes` changes of each kind are written one at a time on the Firestore
emulator: an update of an unread notification, a new one (an add), one marked read (a
remove). A subscriber on the exact channel `user:{uid}` counts the bytes of every message a
change made (the payload as Redis carries it: the envelope's JSON), from the write to the
change's last event (its delta, and with "before" the sync after it).

The whole service runs in this process (`listeners.service.running`) against a private
redis-server and Google's Firestore emulator (or the npm fallback), as the tests do.

    .venv/bin/python -m bench.bytes --unread 10,100,300 --changes 5

The results replace the generated block of this benchmark in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from google.cloud import firestore

from listeners.assemble import running
from listeners.config import FirebaseSettings, RedisSettings, Settings
from listeners_testkit.processes import FirestoreEmulator, RedisServer, emulator_kind

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DOC = PROJECT_ROOT / "docs" / "benchmarks.md"
START, END = "<!-- bench.bytes:start -->", "<!-- bench.bytes:end -->"
KINDS = ("update", "add", "remove")


def notification(doc_id: str, n: int) -> dict[str, Any]:
    """A notification shaped like production's (legacy-data-model.md), ~600 bytes published."""
    return {
        "job_id": doc_id,
        "file_id": f"1AbCdEfGhIjKlMnOpQrStUvWxYz{n:06d}",
        "file_name": f"Facture_fournisseur_2025_{n:06d}.pdf",
        "status": "to_review",
        "collection_id": "company-0001",
        "collection_name": "Pinnokio Demo SA",
        "function_name": "APbookeeper",
        "timestamp": f"2025-09-05 10:{n // 60 % 60:02d}:{n % 60:02d}.123456",
        "read": False,
        "additional_info": json.dumps({"message": "Invoice ready for review", "amount": 1234.5}),
        "batch_id": f"batch-{n // 50:04d}",
    }


class Channel:
    """A subscriber on `user:{uid}` that keeps every message with its size."""

    def __init__(self, client: aioredis.Redis, uid: str) -> None:
        self.pubsub = client.pubsub()
        self.uid = uid
        self.messages: list[tuple[int, dict[str, Any]]] = []
        self.changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.pubsub.subscribe(f"user:{self.uid}")
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            message = await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is not None:
                self.messages.append((len(message["data"]), json.loads(message["data"])))
                self.changed.set()

    async def until(self, predicate: Callable[[list[dict[str, Any]]], bool], since: int) -> None:
        async with asyncio.timeout(60):
            while not predicate([m for _, m in self.messages[since:]]):
                self.changed.clear()
                await self.changed.wait()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.pubsub.aclose()


async def write(call: Callable[..., Any], *args: Any) -> None:
    await asyncio.to_thread(call, *args)


Sizes = dict[str, list[int]]  # kind of change -> bytes of each change


async def measure(settings: Settings, db: firestore.Client, unread: int, changes: int) -> Sizes:
    """Bytes of each change, by kind, for one list length."""
    uid = f"bytes-{uuid.uuid4().hex[:8]}"
    notes = db.collection(f"clients/{uid}/notifications")
    batch = db.batch()
    for n in range(unread):
        batch.set(notes.document(f"job-{n:06d}"), notification(f"job-{n:06d}", n))
        if n % 400 == 399:
            await write(batch.commit)
            batch = db.batch()
    await write(batch.commit)
    client = aioredis.Redis(host=settings.redis.host, port=settings.redis.port)
    channel = Channel(client, uid)
    await channel.start()
    sizes: Sizes = {kind: [] for kind in KINDS}
    try:
        async with running(settings):
            await write(
                db.document(f"listeners_registry/{uid}").set,
                {"status": "online", "heartbeat_at": firestore.SERVER_TIMESTAMP, "ttl_seconds": 600,
                 "authorized_companies_ids": ["company-0001"], "instance_id": "bench"},
            )  # fmt: skip
            await channel.until(lambda ms: any(m["type"] == "notif.sync" for m in ms), 0)
            sync_after = settings.sync_each_change
            for i in range(changes):
                for kind in KINDS:
                    doc = f"job-{i:06d}" if kind != "add" else f"new-{i:06d}"
                    call: Callable[..., Any]
                    args: tuple[Any, ...]
                    if kind == "update":
                        call, args = notes.document(doc).update, ({"status": "completed"},)
                    elif kind == "add":
                        call, args = notes.document(doc).set, (notification(doc, unread + i),)
                    else:
                        call, args = notes.document(doc).update, ({"read": True},)
                    size = await one_change(channel, call, args, f"notif.{kind}", doc, sync_after)
                    sizes[kind].append(size)
            await write(db.document(f"listeners_registry/{uid}").update, {"status": "offline"})
    finally:
        await channel.stop()
        await client.aclose()
    return sizes


async def one_change(
    channel: Channel, call: Callable[..., Any], args: tuple[Any, ...], delta: str, doc: str, sync_after: bool
) -> int:
    """Writes one change and returns the bytes of its messages: up to its delta, and with
    `sync_after` up to the sync after it; nothing later."""

    def ours(m: dict[str, Any]) -> bool:
        return bool(m["type"] == delta and m["payload"]["doc_id"] == doc)

    def done(ms: list[dict[str, Any]]) -> bool:
        at = [j for j, m in enumerate(ms) if ours(m)]
        return bool(at) and (not sync_after or any(m["type"] == "notif.sync" for m in ms[at[0] :]))

    since = len(channel.messages)
    await write(call, *args)
    await channel.until(done, since)
    got = channel.messages[since:]
    last = next(j for j, (_, m) in enumerate(got) if ours(m))
    if sync_after:
        last = next(j for j, (_, m) in enumerate(got) if j > last and m["type"] == "notif.sync")
    return sum(size for size, _ in got[: last + 1])


@contextlib.asynccontextmanager
async def backends() -> AsyncIterator[tuple[RedisServer, FirestoreEmulator]]:
    with RedisServer() as redis_server, FirestoreEmulator() as emulator:
        os.environ["FIRESTORE_EMULATOR_HOST"] = emulator.host
        yield redis_server, emulator


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "src"], capture_output=True, text=True)
    except OSError:
        return "unknown"
    return out.stdout.strip() + (" with uncommitted changes in src/" if dirty.stdout.strip() else "")


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unread", default="10,100,300", help="list lengths, comma-separated")
    parser.add_argument("--changes", type=int, default=5, help="changes of each kind per length")
    parser.add_argument("--no-doc", action="store_true", help="print only; leave docs/benchmarks.md")
    args = parser.parse_args(argv)
    lengths = [int(n) for n in args.unread.split(",")]
    started = time.monotonic()
    rows: list[tuple[int, str, Sizes]] = []
    async with backends() as (redis_server, emulator):
        base = Settings(
            redis=RedisSettings(host="127.0.0.1", port=redis_server.port),
            firebase=FirebaseSettings(f"bench-{uuid.uuid4().hex[:8]}", emulator_host=emulator.host),
            sweep_interval_seconds=0.2,
            instance_id="bench-bytes",
            single_instance=True,
        )
        db = firestore.Client(project=base.firebase.project_id)
        try:
            for unread in lengths:
                for label, each in (("before", True), ("after", False)):
                    settings = dataclasses.replace(base, sync_each_change=each)
                    rows.append((unread, label, await measure(settings, db, unread, args.changes)))
                    print(f"{unread} unread, {label}: {rows[-1][2]}", file=sys.stderr)
        finally:
            db.close()
    report = render(rows, args, time.monotonic() - started)
    print(report)
    if not args.no_doc:
        text = DOC.read_text()
        if START in text:
            head, _, rest = text.partition(START)
            _, _, tail = rest.partition(END)
            DOC.write_text(f"{head}{START}\n{report}{END}{tail}")
        else:
            DOC.write_text(text.rstrip("\n") + "\n\n" + SECTION + f"{START}\n{report}{END}\n")
    return 0


SECTION = """## Bytes published per notification change (`bench/bytes.py`)

What one change to a user's notifications costs on Redis, and so for every consumer, with 10,
100 and 300 unread notifications: before issue 14 (each change's deltas, then a sync of the
whole list, kept as `LISTENERS_SYNC_EACH_CHANGE=true`) and after (the deltas alone, each with
`epoch` and `seq`). The goal of issue 14: at most 2 KB per change whatever the list's length.
The block between the markers is rewritten by each run.

"""


def render(rows: list[tuple[int, str, Sizes]], args: argparse.Namespace, seconds: float) -> str:
    command = f".venv/bin/python -m bench.bytes --unread {args.unread} --changes {args.changes}"
    lines = [
        f"Run of {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {seconds:.0f} s in all.",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}, "
        f"{FirestoreEmulator.describe(emulator_kind())}. Code: `{_commit()}`.",
        "",
        "Bytes per change (mean / max over the changes of each kind; a message's size is its JSON on Redis):",
        "",
        "| unread | mode | update | add | remove | max of all |",
        "|---:|:---|---:|---:|---:|---:|",
    ]
    for unread, label, sizes in rows:
        cells = [f"{sum(v) / len(v):,.0f} / {max(v):,}" if v else "-" for v in (sizes[k] for k in KINDS)]
        worst = max((max(v) for v in sizes.values() if v), default=0)
        lines.append(f"| {unread} | {label} | {' | '.join(cells)} | {worst:,} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
