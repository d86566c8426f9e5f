"""Builds Direct mode for a running service: the hub, the token verifier, the gateway,
and the registry writes that chat subscriptions and presence need."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from listeners.bridge.presence import Presence
from listeners.control import resync_request
from listeners.deliver.batch import Resyncs
from listeners.deliver.hub import Hub
from listeners.deliver.tokens import TokenVerifier
from listeners.deliver.websocket import Gateway, Services
from listeners.publish.channels import Channels
from listeners.service import Service
from listeners.source.registry import REGISTRY_COLLECTION, ChatThread

log = logging.getLogger(__name__)


def firestore_async_client(service: Service) -> Any:
    from google.cloud import firestore

    firebase = service.settings.firebase
    credentials = None
    if not firebase.emulator_host and firebase.admin_json is not None:
        from google.oauth2 import service_account

        info = json.loads(firebase.admin_json.reveal())
        credentials = service_account.Credentials.from_service_account_info(info)  # type: ignore[no-untyped-call]
    return firestore.AsyncClient(project=firebase.project_id, credentials=credentials)


@contextlib.asynccontextmanager
async def direct_mode(service: Service) -> AsyncIterator[Gateway]:
    settings = service.settings
    redis = settings.redis
    hub = Hub(
        service.broker,
        settings.instance_id,
        service.metrics,
        max_message_bytes=settings.websocket.max_event_bytes,
    )
    verifier = TokenVerifier(
        settings.firebase.project_id,
        certs_url=settings.websocket.certs_url,
        clock_skew_seconds=settings.websocket.clock_skew_seconds,
    )
    token = redis.control_token
    # Coalesced per user, in pipelines, paced: a reconnect storm costs one connection and
    # stays under what the control listeners remember (deliver.batch).
    resyncs = (
        Resyncs(
            service.broker,
            redis.control_channel,
            lambda uid, threads: resync_request(token.reveal(), uid, threads),
        )
        if token is not None
        else None
    )
    db = firestore_async_client(service)
    presence = (
        Presence(db, ttl_seconds=settings.service.heartbeat_ttl_seconds)
        if settings.websocket.presence
        else None
    )
    gateway: Gateway

    async def resync(uid: str, threads: tuple[ChatThread, ...]) -> None:
        if resyncs is None:  # no control channel: only a user served here can be resynced
            service.node.resync_user(uid, threads)
            return
        resyncs.request(uid, threads)

    async def write_threads(uid: str, thread: ChatThread, add: bool) -> bool:
        """The user's `chat_threads` in the registry, with `thread` added or removed: True once
        written (for a removal: once it is no longer there)."""
        fields = {"space_code": thread.space_code, "thread_key": thread.thread_key, "mode": thread.mode}
        document = db.collection(REGISTRY_COLLECTION).document(uid)
        if presence is not None:
            await presence.set_threads(uid, sorted(gateway.threads_of(uid), key=str))
            if not add:
                return True
            # Presence keeps a failed write for its next heartbeat and does not say: read it back.
            try:
                snapshot = await document.get()
            except Exception as exc:
                log.warning("chat thread not confirmed", extra={"uid": uid, "reason": type(exc).__name__})
                return False
            return fields in ((snapshot.to_dict() or {}).get("chat_threads") or [])
        # Read, change, write on the condition that nobody wrote in between (and again if so):
        # the field may not exist yet, and other writers (the bridge) may change it too.
        reason = ""
        for _ in range(3):
            try:
                snapshot = await document.get()
                if not snapshot.exists:
                    log.warning("chat thread not written: user not in the registry", extra={"uid": uid})
                    return False
                current = [t for t in (snapshot.to_dict() or {}).get("chat_threads") or [] if t != fields]
                option = db.write_option(last_update_time=snapshot.update_time)
                await document.update({"chat_threads": [*current, fields] if add else current}, option=option)
                return True
            except Exception as exc:  # a concurrent write, or Firestore unreachable: try again
                reason = type(exc).__name__
        log.warning("chat thread not written to the registry", extra={"uid": uid, "reason": reason})
        return False

    async def mark_read(uid: str, doc_id: str) -> bool:
        """The UI marks a notification read: only the token's own, and only an existing one."""
        document = db.collection(f"clients/{uid}/notifications").document(doc_id)
        try:
            await document.update({"read": True})
        except Exception as exc:
            log.warning(
                "notification not marked read",
                extra={"uid": uid, "doc_id": doc_id, "reason": type(exc).__name__},
            )
            return False
        return True

    async def open_thread(uid: str, thread: ChatThread) -> bool:
        return await write_threads(uid, thread, add=True)

    async def close_thread(uid: str, thread: ChatThread) -> None:
        await write_threads(uid, thread, add=False)

    gateway = Gateway(
        settings.websocket,
        settings.service.allowed_origins,
        Services(
            hub=hub,
            verifier=verifier,
            channels=Channels.of(redis),
            metrics=service.metrics,
            entry=service.node.entry,
            resync=resync,
            mark_read=mark_read,
            open_thread=open_thread,
            close_thread=close_thread,
            presence=presence.online if presence is not None else None,
            chat=service.rtdb is not None,
        ),
    )
    service.supervisor.start("hub", hub.run)
    try:
        yield gateway
    finally:
        await gateway.close_all()
        await service.supervisor.stop(["hub"], service.settings.shutdown_timeout_seconds / 4)
        if resyncs is not None:
            await resyncs.aclose()
        await verifier.aclose()
        db.close()
