"""Redis Pub/Sub broker on `redis.asyncio` (ElastiCache in production: AUTH and TLS)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from listeners.backoff import reraise_if_cancelled
from listeners.config import RedisSettings
from listeners.publish.broker import BrokerUnavailable, Handler, Message
from listeners.publish.connection import connection_failed, redis_client
from listeners.publish.redis_subscriber import RedisSubscriber

if TYPE_CHECKING:  # the bridge runs where prometheus_client is not installed
    from listeners.metrics import Metrics


class RedisBroker:
    def __init__(self, settings: RedisSettings, metrics: Metrics | None = None) -> None:
        self._settings = settings
        self._metrics = metrics
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
        except Exception as exc:
            reraise_if_cancelled()
            if not connection_failed(exc):
                raise
            raise BrokerUnavailable(_reason(exc)) from None

    async def ping(self) -> None:
        try:
            await self._client.ping()
        except Exception as exc:
            reraise_if_cancelled()
            if not connection_failed(exc):
                raise
            raise BrokerUnavailable(_reason(exc)) from None

    def subscriber(self, name: str, handler: Handler) -> RedisSubscriber:
        """A pub/sub connection of its own (`name` says whose, in logs and metrics)."""
        metrics = self._metrics

        def counted() -> None:
            if metrics is not None:
                metrics.pubsub_reconnects.labels(name).inc()

        return RedisSubscriber(self._settings, name, handler, on_reconnect_count=counted)


def _reason(exc: BaseException) -> str:
    # Exception text from redis-py names host and port, never the password.
    return f"{type(exc).__name__}: {exc}"[:300]
