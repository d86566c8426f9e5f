"""How the outside sees the service: HTTP health, version and metrics (WebSocket later)."""
