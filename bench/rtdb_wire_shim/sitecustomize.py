"""`python -m bench.rtdb --transports rest,wire`: the service's Realtime Database client by
LISTENERS_RTDB_TRANSPORT before service.py selects it itself.

The benchmark puts this folder first on the service's PYTHONPATH for the `wire` runs; Python
imports this module at start-up, and `listeners.service.rtdb_client` then returns the wire
client (`listeners.source.rtdb_wire.wire_client`). Once service.py reads the key, this goes.
"""

from __future__ import annotations

import os

if os.environ.get("LISTENERS_RTDB_TRANSPORT") == "wire":
    from listeners import service
    from listeners.source.rtdb_wire import wire_client

    service.rtdb_client = wire_client  # type: ignore[assignment]
