"""Connections to Redis (ElastiCache in production: AUTH and TLS), for every part that talks to it."""

from __future__ import annotations

import inspect
import ssl
from typing import Any

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from listeners_bridge.settings import RedisSettings


def _quiet_handshake() -> dict[str, object]:
    """Keyword arguments that keep redis-py from sending CLIENT SETINFO (and, from redis-py 8,
    CLIENT MAINT_NOTIFICATIONS) on every new connection.

    Neither ACL user of deploy/redis-acl.json may run CLIENT: each connection would leave
    refusals in the ACL log, where real refusals must stand out. redis-py ignores the errors, so
    nothing else changes; ElastiCache sends no maintenance notifications anyway. The names of
    these arguments changed across the redis-py versions the package allows (>=5.2).
    """
    parameters = inspect.signature(redis.Redis.__init__).parameters
    quiet: dict[str, object] = {}
    if "driver_info" in parameters:
        quiet["driver_info"] = None
    else:
        quiet.update(lib_name=None, lib_version=None)
    if "maint_notifications_config" in parameters:
        from redis.maint_notifications import MaintNotificationsConfig

        quiet["maint_notifications_config"] = MaintNotificationsConfig(enabled=False)
    return quiet


_QUIET_HANDSHAKE = _quiet_handshake()


def redis_client(settings: RedisSettings, *, timeout: float = 5.0) -> redis.Redis:
    """A client with certificate verification whenever TLS is on (never `CERT_NONE`), logged in
    as `settings.username` (an ACL user, docs/security.md) when one is set, else as the
    default user; on connect it runs nothing but AUTH (or HELLO … AUTH) and, if set, SELECT."""
    kwargs: dict[str, object] = dict(_QUIET_HANDSHAKE)
    if settings.tls:
        kwargs.update(ssl=True, ssl_cert_reqs=ssl.CERT_REQUIRED, ssl_check_hostname=True)
        if settings.ca_file:
            kwargs["ssl_ca_certs"] = settings.ca_file
    password = settings.password.reveal() if settings.password else None
    return redis.Redis(
        host=settings.host,
        port=settings.port,
        db=settings.db,
        username=settings.username or None,
        password=password,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        # The publisher owns reconnection (backoff, resync); hidden retries would only
        # delay its notice that Redis is gone.
        retry=Retry(NoBackoff(), 0),
        **kwargs,  # type: ignore[arg-type]
    )


def connection_failed(exc: BaseException) -> bool:
    """Whether `exc` says the connection to Redis failed, whatever raised it.

    redis-py raises its own errors and OSError (ConnectionError, TimeoutError); but a write on
    a transport the peer has reset raises RuntimeError from the event loop itself ("unable to
    perform operation on <TCPTransport closed=True ...>; the handler is closed" in uvloop,
    "... handler is closed" or "Transport is closed" in asyncio). Those are connection
    failures, not bugs: the part that saw them reconnects and recovers.
    """
    if isinstance(exc, RedisError | OSError):
        return True
    return isinstance(exc, RuntimeError) and ("closed" in str(exc).lower())


async def close_quietly(*connections: Any) -> None:
    """Close pub/sub objects and clients whose Redis may already be gone."""
    for connection in connections:
        try:
            await connection.aclose()
        except Exception as exc:
            if not connection_failed(exc):
                raise
