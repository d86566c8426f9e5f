"""The embedded default: local Redis, the Firestore emulator, the service and a demo writer.

    python -m listeners_testkit.demo [--port 8080] [--duration SECONDS]

Redis is a private redis-server on a free port unless LISTENERS_REDIS_HOST is set; the
Realtime Database is the local stand-in. The writer brings three users online, then keeps
writing, updating and reading their notifications and direct messages, and heartbeats the
registry as the Reflex backend would.

A local token issuer stands in for Firebase Auth: the service verifies its tokens, and it
hands them out to the demo page (/demo) for the three demo users. The operations page
(/ops) is on with an admin token made for this run (or LISTENERS_ADMIN_TOKEN, if set).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import secrets
import signal
import sys
import time
from contextlib import ExitStack, suppress
from datetime import UTC, datetime
from typing import Any

from listeners_testkit.auth import LocalIssuer
from listeners_testkit.processes import FirestoreEmulator, RedisServer, ServiceProcess, free_port
from listeners_testkit.rtdb_server import RtdbStandin

PROJECT = "demo-listeners"
USERS = {"demo-alice": ["acme"], "demo-bob": [], "demo-carol": ["acme", "globex"]}
COMPANIES = ["acme", "globex", "initech"]
STATUSES = ["in_queue", "running", "completed", "error"]
FUNCTIONS = ["Router", "APbookeeper", "Bankbookeeper"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8080")))
    parser.add_argument("--duration", type=float, default=0, help="stop after this many seconds (0: never)")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between demo writes")
    args = parser.parse_args()
    with ExitStack() as stack:
        env = dict(os.environ)
        if not env.get("LISTENERS_REDIS_HOST"):
            redis = stack.enter_context(RedisServer())
            env.update(LISTENERS_REDIS_HOST="127.0.0.1", LISTENERS_REDIS_PORT=str(redis.port))
        emulator = stack.enter_context(FirestoreEmulator())
        database = stack.enter_context(RtdbStandin())
        env.update(FIRESTORE_EMULATOR_HOST=emulator.host, FIREBASE_PROJECT_ID=PROJECT)
        env.update(FIREBASE_DATABASE_EMULATOR_HOST=f"127.0.0.1:{database.port}")
        env.setdefault("LOG_LEVEL", "INFO")
        # A token for this run only, so the bridge's resync requests work on the demo too.
        env.setdefault("LISTENERS_CONTROL_TOKEN", secrets.token_urlsafe(24))
        os.environ["FIRESTORE_EMULATOR_HOST"] = emulator.host
        port = args.port if _port_free(args.port) else free_port()
        # Firebase Auth's stand-in: the service verifies its tokens, the demo page gets them.
        issuer = LocalIssuer(PROJECT)
        certs_url = issuer.serve(
            demo_users=USERS, origins=(f"http://127.0.0.1:{port}", f"http://localhost:{port}")
        )
        stack.callback(issuer.close)
        env.update(LISTENERS_TOKEN_CERTS_URL=certs_url, LISTENERS_DEMO_TOKEN_URL=issuer.token_url)
        admin_token = env.get("LISTENERS_ADMIN_TOKEN") or ""
        generated = not admin_token
        if generated:
            admin_token = env["LISTENERS_ADMIN_TOKEN"] = secrets.token_urlsafe(24)
        service = ServiceProcess(env, port=port)
        stack.callback(service.stop, signal.SIGTERM, 15.0)
        service.wait_listening()
        redis_port = env.get("LISTENERS_REDIS_PORT", "6379")
        print(
            "\n".join(
                [
                    "",
                    "listeners is running on the embedded default.",
                    f"  demo:     http://127.0.0.1:{port}/demo  (pick a user, mark notifications read)",
                    f"  ops:      http://127.0.0.1:{port}/ops  "
                    + (
                        f"(admin token for this run: {admin_token})"
                        if generated
                        else "(admin token: your LISTENERS_ADMIN_TOKEN)"
                    ),
                    f"  health:   curl http://127.0.0.1:{port}/healthz",
                    f"  metrics:  curl http://127.0.0.1:{port}/metrics",
                    f"  events:   redis-cli -h {env['LISTENERS_REDIS_HOST']} -p {redis_port} "
                    f"SUBSCRIBE {' '.join('user:' + u for u in USERS)}",
                    f"  firestore: {emulator.description} on {emulator.host}",
                    "Press Ctrl-C to stop.",
                    "",
                ]
            ),
            flush=True,
        )
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        with suppress(KeyboardInterrupt):
            write_forever(args.interval, args.duration, database.url)


def write_forever(interval: float, duration: float, database_url: str) -> None:
    import httpx
    from google.cloud import firestore

    db = firestore.Client(project=PROJECT)
    rtdb = httpx.Client(base_url=database_url, params={"ns": f"{PROJECT}-default-rtdb"}, timeout=10)
    heartbeat = 0.0
    started = time.monotonic()
    counter = itertools.count(1)
    try:
        while not duration or time.monotonic() - started < duration:
            if time.monotonic() - heartbeat > 30:
                for uid, companies in USERS.items():
                    db.document(f"listeners_registry/{uid}").set(_registry(companies))
                heartbeat = time.monotonic()
            n = next(counter)
            if n % 4 == 0:
                _direct_message(rtdb, n)
            else:
                _step(db, n)
            time.sleep(interval)
    finally:
        for uid in USERS:
            db.document(f"listeners_registry/{uid}").update({"status": "offline"})


def _step(db: Any, n: int) -> None:
    """One change a step: add, then move a job through its statuses, then mark it read."""
    uid = random.choice(list(USERS))
    notifications = db.collection(f"clients/{uid}/notifications")
    unread = list(notifications.where(filter=_unread()).stream())
    if len(unread) < 3 or random.random() < 0.4:
        job = f"job-{n:05d}"
        notifications.document(job).set(
            {
                "job_id": job,
                "file_id": f"file-{n:05d}",
                "file_name": f"invoice-{n:05d}.pdf",
                "status": STATUSES[0],
                "collection_id": random.choice(COMPANIES),
                "collection_name": "Demo company",
                "function_name": random.choice(FUNCTIONS),
                "timestamp": str(datetime.now(UTC).replace(tzinfo=None)),
                "read": False,
                "additional_info": json.dumps({"message": "queued by the demo writer"}),
            }
        )
        print(f"demo: {uid} + {job}", flush=True)
        return
    doc = random.choice(unread)
    status = doc.to_dict().get("status")
    if status == STATUSES[-1] or status == STATUSES[-2]:
        doc.reference.update({"read": True})
        print(f"demo: {uid} read {doc.id}", flush=True)
    else:
        following = STATUSES[min(STATUSES.index(status) + 1 if status in STATUSES else 0, len(STATUSES) - 1)]
        doc.reference.update({"status": following})
        print(f"demo: {uid} {doc.id} -> {following}", flush=True)


def _direct_message(rtdb: Any, n: int) -> None:
    """Every fourth step a direct message arrives; older ones are read (which deletes them)."""
    uid = random.choice(list(USERS))
    base = f"/clients/{uid}/direct_message_notif"
    existing = rtdb.get(f"{base}.json", params={"shallow": "true"}).json() or {}
    if len(existing) >= 2:
        oldest = sorted(existing)[0]
        rtdb.delete(f"{base}/{oldest}.json")
        print(f"demo: {uid} read direct message {oldest}", flush=True)
        return
    message = {
        "file_name": f"contract-{n:05d}.pdf",
        "status": "to_review",
        "job_id": f"job-{n:05d}",
        "collection_id": random.choice(COMPANIES),
        "collection_name": "Demo company",
        "function_name": "Router",
        "timestamp": str(datetime.now(UTC).replace(tzinfo=None)),
        "sender_id": "demo-writer",
        "message": "Please review this contract",
    }
    key = rtdb.post(f"{base}.json", json=message).json()["name"]
    print(f"demo: {uid} + direct message {key}", flush=True)


def _unread() -> Any:
    from google.cloud import firestore

    return firestore.FieldFilter("read", "==", False)


def _registry(companies: list[str]) -> dict[str, Any]:
    from google.cloud import firestore

    return {
        "status": "online",
        "heartbeat_at": firestore.SERVER_TIMESTAMP,
        "ttl_seconds": 90,
        "authorized_companies_ids": companies,
        "instance_id": "demo-writer",
    }


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


if __name__ == "__main__":
    main()
