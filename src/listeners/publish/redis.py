"""Redis Pub/Sub broker on `redis.asyncio` (ElastiCache in production: AUTH and TLS)."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Sequence
from typing import Any

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from listeners.config import RedisSettings
from listeners.publish.broker import BrokerUnavailable, Message


def redis_client(settings: RedisSettings, *, timeout: float = 5.0) -> redis.Redis:
    """A client with certificate verification whenever TLS is on (never `CERT_NONE`)."""
    kwargs: dict[str, object] = {}
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


class RedisBroker:
    def __init__(self, settings: RedisSettings) -> None:
        self._client = redis_client(settings)

    async def connect(self) -> None:
        await self.ping()

    async def disconnect(self) -> None:
        await self._client.aclose()

    async def publish_many(self, messages: Sequence[Message]) -> None:
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for channel, body in messages:
                    pipe.publish(channel, body)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(_reason(exc)) from None

    async def ping(self) -> None:
        try:
            await self._client.ping()
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(_reason(exc)) from None


def _reason(exc: BaseException) -> str:
    # Exception text from redis-py names host and port, never the password.
    return f"{type(exc).__name__}: {exc}"[:300]


async def close_quietly(*connections: Any) -> None:
    """Close pub/sub objects and clients whose Redis may already be gone."""
    for connection in connections:
        with contextlib.suppress(RedisError, OSError):
            await connection.aclose()
