"""The service's two web pages, plain HTML and JavaScript (docs/websocket.md).

Operations, only when an admin token is configured (`LISTENERS_ADMIN_TOKEN`), else 404:
    GET /ops          the page; it asks for the admin token and keeps it in sessionStorage
    GET /ops/state    its data, with `Authorization: Bearer <admin token>` (401 otherwise):
                      identifiers and counts only, never a payload or a secret

Demo, only when `LISTENERS_DEMO_TOKEN_URL` is set (the embedded default sets it), else 404:
    GET /demo         pick a demo user, sign in with a locally minted token, watch the events
    GET /demo/config  `{token_url, ws_path}` for the page

Both pages load their CSS and JavaScript from `/assets/NAME` (package data under static/).
`/assets/listeners-client.js`, the browser client module of Direct mode (docs/websocket.md),
is served whether the pages are on or not, to any origin (public code, no credentials).
"""

from __future__ import annotations

import os
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from listeners.config import Settings
from listeners.deliver.admin import bearer_matches
from listeners.deliver.ports import Instance
from listeners.deliver.websocket import Gateway

CLIENT_MODULE = "listeners-client.js"

_MEDIA = {".html": "text/html", ".css": "text/css", ".js": "text/javascript"}
_NO_STORE = {"Cache-Control": "no-store"}


def _static(name: str) -> bytes:
    """A file under static/ (package data: a build without them fails here, at start-up)."""
    return (resources.files(__package__ or "listeners.deliver") / "static" / name).read_bytes()


def _headers(csp: str) -> dict[str, str]:
    return {
        "Content-Security-Policy": csp,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }


def _csp(connect: str = "'self'") -> str:
    return (
        f"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        f"connect-src {connect}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


def _file_response(files: dict[str, bytes], name: str, csp: str) -> Response:
    media = _MEDIA[os.path.splitext(name)[1]] + "; charset=utf-8"
    return Response(files[name], media_type=media, headers=_headers(csp))


def websocket_state(gateway: Gateway | None) -> dict[str, Any] | None:
    """This process's sockets, for the operations page (None without Direct mode)."""
    if gateway is None:
        return None
    return {
        "sockets": gateway.count,
        "users": len(gateway.sockets),
        "hub_connected": gateway.services.hub.connected,
        "hub_channels": gateway.services.hub.channels,
    }


def routes(settings: Settings, demo_token_url: str | None = None) -> list[BaseRoute]:
    """The pages' routes; none for a page that is off."""
    admin = settings.websocket.admin_token
    token_url = settings.service.demo_token_url if demo_token_url is None else demo_token_url
    found: list[BaseRoute] = []
    files: dict[str, bytes] = {CLIENT_MODULE: _static(CLIENT_MODULE)}

    if admin is not None:
        files.update((name, _static(name)) for name in ("ops.html", "ops.js", "pages.css"))

        async def ops(request: Request) -> Response:
            return _file_response(files, "ops.html", _csp())

        async def ops_state(request: Request) -> Response:
            if not bearer_matches(request, admin.reveal()):
                return JSONResponse(
                    {"error": "admin token required"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer", **_NO_STORE},
                )
            service: Instance | None = getattr(request.app.state, "service", None)
            if service is None:
                return JSONResponse({"status": "starting"}, status_code=503, headers=_NO_STORE)
            gateway: Gateway | None = getattr(request.app.state, "gateway", None)
            return JSONResponse(service.operations(websocket_state(gateway)), headers=_NO_STORE)

        found += [Route("/ops", ops), Route("/ops/state", ops_state)]

    if token_url:
        files.update((name, _static(name)) for name in ("demo.html", "demo.js", "pages.css"))
        parts = urlsplit(token_url)
        demo_csp = _csp(f"'self' {parts.scheme}://{parts.netloc}")

        async def demo(request: Request) -> Response:
            return _file_response(files, "demo.html", demo_csp)

        async def demo_config(request: Request) -> Response:
            return JSONResponse(
                {"token_url": token_url, "ws_path": settings.service.alb_ws_path}, headers=_NO_STORE
            )

        found += [Route("/demo", demo), Route("/demo/config", demo_config)]

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in files or name.endswith(".html"):
            return Response("not found", status_code=404, media_type="text/plain")
        response = _file_response(files, name, _csp())
        if name == CLIENT_MODULE:  # a module script is fetched with CORS from the app's origin
            response.headers["Access-Control-Allow-Origin"] = "*"
        return response

    found.append(Route("/assets/{name}", asset))
    return found
