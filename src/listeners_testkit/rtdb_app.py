"""The stand-in as a server: the REST app (listeners_testkit.rtdb_server) and its WebSocket side
(listeners_testkit.rtdb_wire_server) over one hub.

    python -m listeners_testkit.rtdb_app --port N [--keepalive S] [--token T]
"""

from __future__ import annotations

import argparse
import os
import socket

import uvicorn

from listeners_testkit.rtdb_server import _CLOSE, Hub, build_app
from listeners_testkit.rtdb_wire_server import WireEndpoint


class _Server(uvicorn.Server):
    """Ends the event streams first on shutdown; uvicorn would otherwise wait on them."""

    def __init__(self, config: uvicorn.Config, hub: Hub) -> None:
        super().__init__(config)
        self.hub = hub

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.hub.drop(_CLOSE)
        await super().shutdown(sockets)


def serve(host: str, port: int, hub: Hub) -> None:
    config = uvicorn.Config(
        build_app(hub, WireEndpoint(hub)),
        host=host,
        port=port,
        http="h11",
        lifespan="off",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=2,
    )
    _Server(config, hub).run()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--keepalive", type=float, default=30.0, help="seconds between keep-alives; 0: none")
    parser.add_argument("--token", default=os.environ.get("RTDB_STANDIN_TOKEN"), help="require this token")
    args = parser.parse_args(argv)
    serve(args.host, args.port, Hub(keepalive=args.keepalive, token=args.token))


if __name__ == "__main__":
    main()
