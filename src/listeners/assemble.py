"""The composition root: the one module that builds the parts of an instance from its
settings and connects them. `create_app` is what the container runs (app/main.py).

- `running`: the service (broker, publisher, Firestore source, Realtime Database client,
  node, control listener, membership, supervisor), started (`Service.run`);
- `direct_mode`: WebSocket Direct mode on a running service (hub, token verifier, resync
  requests, the registry and notification stores, presence, the gateway);
- `create_app`: the HTTP application, whose lifespan runs both inside the process's
  lifetime (listeners.process: signals, watchdog, exit status).

Why a module of its own rather than service.py: building needs every package (source,
publish, deliver, bridge), and nothing may import it back. Service stays what runs; deliver/
receives Protocols (deliver.ports) and never reaches up here. The service-account JSON is
parsed once, by `ServiceAccount`, for every Google client.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from starlette.applications import Starlette

from listeners.cluster import Membership
from listeners.config import FirebaseSettings, Settings
from listeners.control import ControlListener, ResyncRequest
from listeners.deliver import http, wsprotocol
from listeners.deliver.admission import ADMISSION_STATE
from listeners.deliver.batch import Resyncs
from listeners.deliver.httpprotocol import HEADER_DEADLINE_STATE, HeaderDeadline
from listeners.deliver.hub import Hub
from listeners.deliver.revocation import SCOPES as REVOCATION_SCOPES
from listeners.deliver.revocation import RevocationCheck
from listeners.deliver.tokens import TokenVerifier
from listeners.deliver.websocket import Gateway, Services
from listeners.metrics import Metrics
from listeners.node import Node, NodeSettings
from listeners.process import THIS_PROCESS, Lifetime, ProcessHooks
from listeners.publish.publisher import Publisher
from listeners.service import HANDOVER_SECONDS, Service
from listeners.session import Sources, StreamOptions
from listeners.source import access_tokens
from listeners.source.access_tokens import emulator_token
from listeners.source.firestore import FirestoreSource
from listeners.source.listen import ListenSource
from listeners.source.rtdb import RtdbClient, ServiceAccountTokens
from listeners.source.rtdb_wire import RtdbSource, WireClient
from listeners.source.snapshots import SnapshotSource
from listeners.source.stores import NotificationStore
from listeners.streams.view import Publishing
from listeners.supervisor import Supervisor
from listeners_bridge.broker import Broker
from listeners_bridge.channels import Channels
from listeners_bridge.presence import Presence
from listeners_bridge.redis import RedisBroker
from listeners_bridge.registry import ChatThread, RegistryStore
from listeners_bridge.resync import resync_request

_FIRESTORE_SCOPES = ["https://www.googleapis.com/auth/datastore"]


# -- Google clients -------------------------------------------------------------


class ServiceAccount:
    """`FIREBASE_ADMIN_JSON`, parsed on first use and once, for every client that needs it."""

    def __init__(self, firebase: FirebaseSettings) -> None:
        self._secret = firebase.admin_json
        self._info: dict[str, Any] | None = None

    def info(self) -> dict[str, Any] | None:
        if self._secret is None:
            return None
        if self._info is None:
            self._info = json.loads(self._secret.reveal())
        return self._info

    def credentials(self, scopes: list[str] | None = None) -> Any:
        info = self.info()
        if info is None:
            return None
        from google.oauth2 import service_account

        return service_account.Credentials.from_service_account_info(info, scopes=scopes)  # type: ignore[no-untyped-call]


def firestore_source(
    settings: Settings, account: ServiceAccount, metrics: Metrics | None = None
) -> SnapshotSource:
    firebase = settings.firebase
    credentials = None if firebase.emulator_host else account.credentials(_FIRESTORE_SCOPES)
    if settings.firestore_source == "listen":
        return ListenSource(
            firebase.project_id,
            emulator_host=firebase.emulator_host or None,
            credentials=credentials,
            max_streams_per_connection=settings.max_streams_per_connection,
            targets_per_stream=settings.targets_per_stream,
            metrics=metrics,
        )
    return FirestoreSource(
        firebase.project_id, credentials, max_streams_per_connection=settings.max_streams_per_connection
    )


def revocation_check(settings: Settings, account: ServiceAccount) -> RevocationCheck | None:
    """LISTENERS_TOKEN_CHECK_REVOKED: Identity Toolkit lookups with the service account's tokens."""
    ws = settings.websocket
    if not ws.check_revoked:
        return None
    credentials = account.credentials(list(REVOCATION_SCOPES))
    return RevocationCheck(
        settings.firebase.project_id,
        base_url=ws.revocation_url,
        ttl_seconds=ws.revocation_ttl_seconds,
        access_token=access_tokens.ServiceAccountTokens(credentials) if credentials is not None else None,
    )


def firestore_client(firebase: FirebaseSettings, account: ServiceAccount) -> Any:
    """Direct mode's Firestore writes (google.cloud.firestore.AsyncClient)."""
    from google.cloud import firestore

    credentials = None if firebase.emulator_host else account.credentials()
    return firestore.AsyncClient(project=firebase.project_id, credentials=credentials)


def rtdb_client(
    firebase: FirebaseSettings, account: ServiceAccount, transport: str = "rest"
) -> RtdbSource | None:
    """The Realtime Database client, or None when no database is configured: REST streaming
    (one connection per listened node), or the wire protocol (every listen on a few
    WebSockets; `LISTENERS_RTDB_TRANSPORT=wire`, docs/rtdb.md)."""
    make = WireClient if transport == "wire" else RtdbClient
    if firebase.database_emulator_host:
        namespace = rtdb_namespace(firebase.database_url, firebase.project_id)
        return make(f"http://{firebase.database_emulator_host}", namespace=namespace, tokens=emulator_token)
    info = account.info()
    if firebase.database_url and info is not None:
        return make(firebase.database_url, tokens=ServiceAccountTokens.from_service_account_info(info))
    return None


def rtdb_namespace(url: str, project_id: str) -> str:
    """`https://NAME.firebaseio.com` (or `?ns=NAME`) -> NAME; default `{project}-default-rtdb`."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    if "ns" in query:
        return query["ns"]
    if parts.hostname:
        return parts.hostname.split(".")[0]
    return f"{project_id}-default-rtdb"


# -- the service ----------------------------------------------------------------


@contextlib.asynccontextmanager
async def running(
    settings: Settings,
    *,
    broker: Broker | None = None,
    source: SnapshotSource | None = None,
    rtdb: RtdbSource | None = None,
    account: ServiceAccount | None = None,
    on_fatal: Callable[[str], None] = lambda reason: None,
    process_exits: bool = False,
) -> AsyncIterator[Service]:
    """The whole service, started; on exit it stops the listeners, then flushes what is queued.

    `on_fatal(reason)` is called when a task cannot be kept alive (after `service.failed` is
    set): the application then stops the process with a non-zero status (listeners.process).
    `process_exits`: see `Service.run`.
    """
    account = account or ServiceAccount(settings.firebase)
    metrics = Metrics()
    broker = broker or RedisBroker(settings.redis, lambda name: metrics.pubsub_reconnects.labels(name).inc())
    source = source or firestore_source(settings, account, metrics)
    rtdb = rtdb or rtdb_client(settings.firebase, account, settings.rtdb_transport)
    if rtdb is not None:
        rtdb.on_reconnect = lambda cause: metrics.rtdb_reconnects.labels(cause).inc()
    membership = Membership(settings.redis, settings.instance_id, broker=broker)
    publisher = Publisher(broker, metrics, max_queue=settings.publish_queue_max)
    node = Node(
        NodeSettings(
            channels=Channels.of(settings.redis),
            default_ttl_seconds=settings.service.heartbeat_ttl_seconds,
            sweep_interval_seconds=settings.sweep_interval_seconds,
            close_timeout_seconds=settings.shutdown_timeout_seconds / 4,
            handover_seconds=HANDOVER_SECONDS,
            streams=StreamOptions(
                Publishing(settings.instance_id, settings.sync_each_change),
                chat_mark_read=settings.firebase.chat_mark_read,
                chat_history=settings.chat_history,
            ),
        ),
        Sources(source, rtdb),
        publisher,
        metrics,
        owns=(lambda uid: membership.conflict is None) if settings.single_instance else membership.owns,
        members=lambda: len(membership.members),
    )
    metrics.instance.labels(settings.instance_id).set(1)
    publisher.resync = node.resync
    membership.on_change(node.rebalance)

    def on_resync(request: ResyncRequest) -> None:
        node.resync_user(request.uid, request.threads)

    def fail(reason: str) -> None:
        service.fail(reason)
        on_fatal(reason)

    control = ControlListener(broker, settings.redis, on_resync, metrics)
    supervisor = Supervisor(metrics, fail)
    service = Service(
        settings, metrics, publisher, source, node, control, membership, broker, supervisor, rtdb
    )
    async with service.run(process_exits=process_exits):
        yield service


# -- Direct mode ----------------------------------------------------------------


@contextlib.asynccontextmanager
async def direct_mode(service: Service, account: ServiceAccount | None = None) -> AsyncIterator[Gateway]:
    """WebSocket Direct mode on a running service, until the block ends."""
    settings = service.settings
    redis = settings.redis
    account = account or ServiceAccount(settings.firebase)
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
    revocation = revocation_check(settings, account)
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
    db = firestore_client(settings.firebase, account)
    ttl = settings.service.heartbeat_ttl_seconds
    presence = Presence(db, ttl_seconds=ttl) if settings.websocket.presence else None

    async def resync(uid: str, threads: tuple[ChatThread, ...]) -> None:
        if resyncs is None:  # no control channel: only a user served here can be resynced
            service.node.resync_user(uid, threads)
            return
        resyncs.request(uid, threads)

    gateway = Gateway(
        settings.websocket,
        settings.service.allowed_origins,
        Services(
            hub=hub,
            verifier=verifier,
            channels=Channels.of(redis),
            metrics=service.metrics,
            entries=service.node,
            resync=resync,
            notifications=NotificationStore(db),
            registry=RegistryStore(db),
            presence=presence,
            revocation=revocation,
            chat=service.rtdb is not None,
        ),
        path=settings.service.alb_ws_path,
    )
    service.metrics.ws_max_sockets.set(settings.websocket.max_sockets)
    service.supervisor.start("hub", hub.run)
    try:
        yield gateway
    finally:
        await gateway.close_all()
        await service.supervisor.stop(["hub"], settings.shutdown_timeout_seconds / 4)
        if resyncs is not None:
            await resyncs.aclose()
        await verifier.aclose()
        if revocation is not None:
            await revocation.aclose()
        db.close()


# -- the application ------------------------------------------------------------


def create_app(settings: Settings, *, process: ProcessHooks = THIS_PROCESS) -> Starlette:
    wsprotocol.configure(settings.websocket.deflate, settings.websocket.close_timeout_seconds)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        lifetime = Lifetime(process, settings.shutdown_timeout_seconds)
        account = ServiceAccount(settings.firebase)
        async with (
            running(settings, account=account, on_fatal=process.stop, process_exits=process.exits) as service,
            direct_mode(service, account) as gateway,
        ):
            app.state.service = service
            app.state.gateway = gateway
            with lifetime.stopping_on_signal(service.begin_stop):
                # The lifespan state reaches the protocols (UVICORN_HTTP, UVICORN_WS): the
                # refusals before the handshake, and the deadline of a request's head.
                yield {
                    ADMISSION_STATE: gateway.admission,
                    HEADER_DEADLINE_STATE: HeaderDeadline(
                        settings.service.http_header_timeout_seconds, service.metrics.http_header_timeouts.inc
                    ),
                }
            service.stopping = True
        lifetime.exit(service.failed)

    return http.application(settings, lifespan)
