"""What only Google's own Firestore emulator shows, as production does: preconditions are
enforced (presence across backend processes relies on it), and many Listen targets share one
stream, each answered with its own changes only (the multiplexed source relies on it).

The npm fallback resends every watched query on each write and may not enforce preconditions:
there these tests are skipped, saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.api_core import exceptions
from google.cloud import firestore
from google.cloud.firestore_v1.services.firestore import FirestoreAsyncClient
from google.cloud.firestore_v1.services.firestore.transports.grpc_asyncio import (
    FirestoreGrpcAsyncIOTransport,
)
from google.cloud.firestore_v1.types import firestore as wire
from google.cloud.firestore_v1.types import query as query_pb

from listeners_bridge import Presence
from listeners_testkit.processes import FirestoreEmulator

from .conftest import Firebase, google_emulator_only

pytestmark = pytest.mark.asyncio


@google_emulator_only("preconditions on a document's update time are enforced")
async def test_presence_never_marks_offline_a_user_another_process_kept_online(
    emulator: FirestoreEmulator, project_id: str, fb: Firebase
) -> None:
    """Two backend processes serve the same user; the first to leave must not write offline."""
    db_a, db_b = firestore.AsyncClient(project=project_id), firestore.AsyncClient(project=project_id)
    a, b = Presence(db_a, instance_id="backend-a"), Presence(db_b, instance_id="backend-b")
    registry = fb.db.document("listeners_registry/zoe")
    try:
        async with b.online("zoe"):
            async with a.online("zoe"):
                await a.wait_written("zoe")
                await b.wait_written("zoe")
                await b.set_threads("zoe", [])  # b wrote after a: a's precondition is now stale
            # a left: its conditional offline write was refused by the emulator
            assert (await asyncio.to_thread(registry.get)).get("status") == "online"
        # the last process left: nothing wrote since, so its offline write lands
        assert (await asyncio.to_thread(registry.get)).get("status") == "offline"
    finally:
        db_a.close()
        db_b.close()


@google_emulator_only("a stale precondition is refused with FAILED_PRECONDITION")
async def test_a_stale_update_time_is_refused(project_id: str) -> None:
    db = firestore.AsyncClient(project=project_id)
    try:
        document = db.document("listeners_registry/yan")
        first = await document.set({"status": "online"})
        await document.set({"status": "online", "ttl_seconds": 90})
        with pytest.raises(exceptions.FailedPrecondition):
            await document.update(
                {"status": "offline"}, option=db.write_option(last_update_time=first.update_time)
            )
    finally:
        db.close()


def query_target(project_id: str, target_id: int, collection: str) -> wire.Target:
    parent = f"projects/{project_id}/databases/(default)/documents"
    structured = query_pb.StructuredQuery(
        from_=[query_pb.StructuredQuery.CollectionSelector(collection_id=collection)]
    )
    return wire.Target(
        target_id=target_id,
        query=wire.Target.QueryTarget(parent=parent, structured_query=structured),
    )


@google_emulator_only("many targets on one Listen stream, each answered with its own changes")
async def test_many_targets_share_one_stream_and_each_gets_only_its_changes(
    emulator: FirestoreEmulator, project_id: str, fb: Firebase
) -> None:
    targets = 50
    database = f"projects/{project_id}/databases/(default)"
    requests: asyncio.Queue[wire.ListenRequest | None] = asyncio.Queue()
    for n in range(1, targets + 1):
        requests.put_nowait(
            wire.ListenRequest(database=database, add_target=query_target(project_id, n, f"c{n}"))
        )

    async def outgoing() -> AsyncIterator[wire.ListenRequest]:
        while (request := await requests.get()) is not None:
            yield request

    channel = grpc.aio.insecure_channel(emulator.host)
    client = FirestoreAsyncClient(transport=FirestoreGrpcAsyncIOTransport(channel=channel))
    current: set[int] = set()
    changed: list[tuple[str, list[int]]] = []
    # Without the resource prefix the emulator accepts the targets but never sends their changes.
    metadata = [("authorization", "Bearer owner"), ("google-cloud-resource-prefix", database)]
    stream = await client.listen(outgoing(), metadata=metadata)
    try:
        async with asyncio.timeout(60):
            async for response in stream:
                kind = wire.ListenResponse.pb(response).WhichOneof("response_type")
                if kind == "target_change":
                    change = response.target_change
                    if change.target_change_type == wire.TargetChange.TargetChangeType.CURRENT:
                        current.update(change.target_ids)
                        if len(current) == targets:
                            # every target is current on this one stream: now write to one
                            await fb.set("c7/doc", {"n": 7})
                    if change.cause.code:
                        raise AssertionError(f"target error: {change.cause}")
                elif kind == "document_change":
                    doc: Any = response.document_change
                    changed.append((doc.document.name.rsplit("/", 2)[-2], list(doc.target_ids)))
                    break
    finally:
        await requests.put(None)
        with contextlib.suppress(Exception):
            stream.cancel()  # type: ignore[attr-defined]
        await channel.close()
    assert current == set(range(1, targets + 1))
    assert changed == [("c7", [7])]  # its own target only, not a resend to all 50
