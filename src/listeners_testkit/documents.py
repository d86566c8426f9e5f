"""Documents as the application writes them, for the benchmarks: registry entries (through the
registry's own `online_fields`, so their shape has one home) and notifications."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from google.cloud import firestore

from listeners_bridge.registry import REGISTRY_COLLECTION, ChatThread, online_fields

FOREVER = "2999-01-01T00:00:00Z"  # a heartbeat that never expires: no write while a bench runs
WEEK = 7 * 86400  # seconds: a TTL that outlasts any run
BATCH = 500  # writes in one Firestore batch, at most


def write_online(
    db: firestore.Client,
    uids: Sequence[str],
    *,
    heartbeat: object = firestore.SERVER_TIMESTAMP,
    ttl_seconds: int = 600,
    companies: Iterable[str] = (),
    threads: Mapping[str, ChatThread] | None = None,
    instance_id: str = "bench",
) -> None:
    """Every user of `uids` online, in batches; a user in `threads` with that chat thread open."""
    companies = list(companies)
    for i in range(0, len(uids), BATCH):
        batch = db.batch()
        for uid in uids[i : i + BATCH]:
            thread = (threads or {}).get(uid)
            entry = online_fields(
                heartbeat, ttl_seconds, instance_id, companies, [thread] if thread else None
            )
            batch.set(db.document(f"{REGISTRY_COLLECTION}/{uid}"), entry)
        batch.commit(timeout=60)


def notification_data(doc_id: str) -> dict[str, Any]:
    """An unread notification document as the application writes one (every benchmark)."""
    return {
        "job_id": doc_id,
        "file_name": f"{doc_id}.pdf",
        "status": "completed",
        "collection_id": "c1",
        "timestamp": datetime.now(UTC).replace(tzinfo=None).isoformat(),
        "read": False,
        "additional_info": "{}",
    }


def a_day_from_now() -> datetime:
    """A heartbeat that outlasts a run: no heartbeat write is needed while it lasts."""
    return datetime.now(UTC) + timedelta(days=1)


def write_unread(db: firestore.Client, uids: Sequence[str], per_user: int) -> None:
    """`per_user` unread notifications for each user (`clients/{uid}/notifications/n{k}-{uid}`)."""
    docs = [(uid, f"n{k}-{uid}") for uid in uids for k in range(per_user)]
    for i in range(0, len(docs), BATCH):
        batch = db.batch()
        for uid, doc_id in docs[i : i + BATCH]:
            batch.set(db.document(f"clients/{uid}/notifications/{doc_id}"), notification_data(doc_id))
        batch.commit(timeout=60)
