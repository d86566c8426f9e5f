"""How the outside sees the service: HTTP (health, version, metrics, operator pages) and
WebSocket Direct mode. What it needs from the rest of the instance comes in as the
Protocols of `ports`; nothing here imports the service or the bridge."""
