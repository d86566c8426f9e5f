"""HTTP endpoints: /healthz for the ALB, /version, /metrics for Prometheus, and the
WebSocket of Direct mode on `alb_ws_path` (deliver.websocket).

/healthz answers 200 while the process can serve, with `status: "degraded"` when Redis or
the registry watch is down: restarting the task would not bring Redis back, and the ALB
would otherwise drain every instance at once. It answers 503 only while the instance
starts or stops, so the ALB sends it no new WebSocket during a drain, and once a task could
not be kept alive (`status: "failed"`), while the process stops to be replaced.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from listeners import __version__
from listeners.config import Settings
from listeners.deliver import pages
from listeners.deliver.admin import bearer_matches
from listeners.deliver.ports import Instance
from listeners.deliver.websocket import Gateway

# Its state is the ASGI lifespan state every request's scope copies.
Lifespan = Callable[[Starlette], AbstractAsyncContextManager[Mapping[str, Any]]]


def application(settings: Settings, lifespan: Lifespan) -> Starlette:
    """The routes; `lifespan` runs the instance and puts it in `app.state`: `service` (an
    `Instance`) and `gateway`. Until then the routes answer as a starting instance."""

    async def websocket(websocket: WebSocket) -> None:
        gateway: Gateway | None = getattr(websocket.app.state, "gateway", None)
        if gateway is None:
            await websocket.close(code=1013)
            return
        await gateway.endpoint(websocket)

    async def healthz(request: Request) -> Response:
        service: Instance | None = getattr(request.app.state, "service", None)
        if service is None:
            return JSONResponse({"status": "starting", "version": __version__}, status_code=503)
        body = service.health()
        return JSONResponse(body, status_code=503 if service.stopping or service.failed else 200)

    async def version(request: Request) -> Response:
        return JSONResponse({"version": __version__, "instance_id": settings.instance_id})

    async def user(request: Request) -> Response:
        """Operators only: which instance serves a user, and how (admin token required)."""
        service: Instance | None = getattr(request.app.state, "service", None)
        admin = settings.websocket.admin_token
        if admin is None:
            return JSONResponse({"error": "not enabled: set LISTENERS_ADMIN_TOKEN"}, status_code=404)
        if not bearer_matches(request, admin.reveal()):
            return JSONResponse({"error": "admin token required"}, status_code=401)
        if service is None:
            return JSONResponse({"error": "starting"}, status_code=503)
        return JSONResponse(service.user(request.path_params["uid"]))

    async def metrics(request: Request) -> Response:
        service: Instance | None = getattr(request.app.state, "service", None)
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
