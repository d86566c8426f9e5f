"""HTTP endpoints: /healthz for the ALB, /version, /metrics for Prometheus.

/healthz answers 200 while the process can serve, with `status: "degraded"` when Redis or
the registry watch is down: restarting the task would not bring Redis back, and the ALB
would otherwise drain every instance at once. It answers 503 only while the instance
starts or stops, so the ALB sends it no new WebSocket during a drain.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from listeners import __version__
from listeners.config import Settings
from listeners.service import Service, running


def create_app(settings: Settings) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with running(settings) as service:
            app.state.service = service
            yield
            service.stopping = True

    async def healthz(request: Request) -> Response:
        service: Service | None = getattr(request.app.state, "service", None)
        if service is None:
            return JSONResponse({"status": "starting", "version": __version__}, status_code=503)
        body = service.health()
        return JSONResponse(body, status_code=503 if service.stopping else 200)

    async def version(request: Request) -> Response:
        return JSONResponse({"version": __version__, "instance_id": settings.instance_id})

    async def metrics(request: Request) -> Response:
        service: Service | None = getattr(request.app.state, "service", None)
        body = service.metrics.render() if service else b""
        return Response(body, media_type="text/plain; version=0.0.4")

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/version", version),
            Route("/metrics", metrics),
        ],
        lifespan=lifespan,
    )
