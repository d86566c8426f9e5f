"""HTTP endpoints: /healthz for the ALB, /version, /metrics for Prometheus, and the
WebSocket of Direct mode on `alb_ws_path` (deliver.websocket).

/healthz answers 200 while the process can serve, with `status: "degraded"` when Redis or
the registry watch is down: restarting the task would not bring Redis back, and the ALB
would otherwise drain every instance at once. It answers 503 only while the instance
starts or stops, so the ALB sends it no new WebSocket during a drain, and once a task could
not be kept alive (`status: "failed"`), while the process stops to be replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from listeners import __version__
from listeners.config import Settings
from listeners.deliver import pages, wsprotocol
from listeners.deliver.direct import direct_mode
from listeners.deliver.websocket import Gateway
from listeners.service import Service, running

EXIT_TASK_FAILED = 70  # EX_SOFTWARE: a task could not be kept alive (docs/liveness.md)
EXIT_SHUTDOWN_CUT = 75  # EX_TEMPFAIL: the shutdown overran its budget and was cut short
log = logging.getLogger("listeners")


def _sigterm_self(reason: str) -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def _exit_now(status: int) -> None:
    logging.shutdown()
    os._exit(status)


@dataclass(frozen=True)
class ProcessHooks:
    """What the app does to its own process. Tests running the app in their own process
    replace both, so that a failure there fails the test instead of ending it."""

    # A task cannot be kept alive: stop as on SIGTERM (hand users over, flush), after which
    # the lifespan exits with EXIT_TASK_FAILED so that ECS replaces the task.
    stop: Callable[[str], None] = _sigterm_self
    # Leave now with this status (everything that could be closed is closed).
    exit: Callable[[int], None] = _exit_now
    # `exit` ends the process: the shutdown leaves the users' streams to it (service.running).
    exits: bool = True


def create_app(settings: Settings, *, process: ProcessHooks = ProcessHooks()) -> Starlette:
    wsprotocol.configure(settings.websocket.deflate, settings.websocket.close_timeout_seconds)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with (
            running(settings, on_fatal=process.stop, process_exits=process.exits) as service,
            direct_mode(service) as gateway,
        ):
            app.state.service = service
            app.state.gateway = gateway
            watchdog = Watchdog(settings.shutdown_timeout_seconds, process)

            def stop_signal() -> None:
                watchdog.start()
                service.begin_stop()  # the leaving goes on; the shutdown awaits it

            with on_stop_signal(stop_signal):
                yield
            watchdog.start()  # a stop without a signal (the server's own) is bounded too
            service.stopping = True
        watchdog.cancel()
        if service.failed:
            # uvicorn has no exit status of its own for this: everything is closed, so leave now.
            log.critical(
                "exiting after a task failure", extra={"status": EXIT_TASK_FAILED, "reason": service.failed}
            )
            process.exit(EXIT_TASK_FAILED)
        # Events are flushed, the membership left, every client closed or its budget spent.
        # asyncio's own teardown would now cancel the stream tasks still unwinding one at a
        # time (5 s for 10,000 Realtime Database streams, measured); the kernel closes their
        # sockets at once.
        log.info("exiting", extra={"status": 0})
        process.exit(0)

    async def websocket(websocket: WebSocket) -> None:
        gateway: Gateway | None = getattr(websocket.app.state, "gateway", None)
        if gateway is None:
            await websocket.close(code=1013)
            return
        await gateway.endpoint(websocket)

    async def healthz(request: Request) -> Response:
        service: Service | None = getattr(request.app.state, "service", None)
        if service is None:
            return JSONResponse({"status": "starting", "version": __version__}, status_code=503)
        body = service.health()
        return JSONResponse(body, status_code=503 if service.stopping or service.failed else 200)

    async def version(request: Request) -> Response:
        return JSONResponse({"version": __version__, "instance_id": settings.instance_id})

    async def user(request: Request) -> Response:
        """Operators only: which instance serves a user, and how (admin token required)."""
        service: Service | None = getattr(request.app.state, "service", None)
        admin = settings.websocket.admin_token
        if admin is None:
            return JSONResponse({"error": "not enabled: set LISTENERS_ADMIN_TOKEN"}, status_code=404)
        given = request.headers.get("authorization", "").removeprefix("Bearer ").encode()
        if not hmac.compare_digest(given, admin.reveal().encode()):
            return JSONResponse({"error": "admin token required"}, status_code=401)
        if service is None:
            return JSONResponse({"error": "starting"}, status_code=503)
        return JSONResponse(service.user(request.path_params["uid"]))

    async def metrics(request: Request) -> Response:
        service: Service | None = getattr(request.app.state, "service", None)
        body = service.metrics.render() if service else b""
        return Response(body, media_type="text/plain; version=0.0.4")

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/version", version),
            Route("/metrics", metrics),
            Route("/v1/users/{uid}", user),
            WebSocketRoute(settings.service.alb_ws_path, websocket),
            *pages.routes(settings),
        ],
        lifespan=lifespan,
    )


class Watchdog:
    """Ends the process `budget` seconds after `start()`, whatever the shutdown waits on (a
    saturated loop, a library that does not let go): ECS and deployments count on it. A
    thread, because the loop may be the thing that is stuck."""

    def __init__(self, budget: float, process: ProcessHooks) -> None:
        self._timer = threading.Timer(budget, self._overrun, (process,))
        self._timer.daemon = True

    def start(self) -> None:
        if not self._timer.is_alive() and not self._timer.finished.is_set():
            self._timer.start()

    def cancel(self) -> None:
        self._timer.cancel()

    @staticmethod
    def _overrun(process: ProcessHooks) -> None:
        log.error("shutdown budget exhausted (LISTENERS_SHUTDOWN_TIMEOUT_SECONDS); exiting now")
        process.exit(EXIT_SHUTDOWN_CUT)


@contextlib.contextmanager
def on_stop_signal(begin: Callable[[], object]) -> Iterator[None]:
    """Runs `begin` on the loop as soon as SIGTERM or SIGINT arrives, then the handler that
    was there (the server's, which starts its own shutdown). The stop begins at the signal,
    not after the server has closed its connections, which can take seconds."""
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(begin)
        chained = previous.get(signum)
        if callable(chained):
            chained(signum, frame)
        elif chained == signal.SIG_DFL:
            raise SystemExit(128 + signum)

    if threading.current_thread() is not threading.main_thread():
        yield  # signals are only delivered to the main thread
        return
    for signum in (int(signal.SIGTERM), int(signal.SIGINT)):
        previous[signum] = signal.getsignal(signum)
        signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, chained in previous.items():
            if signal.getsignal(signum) is handler:
                signal.signal(signum, chained)
