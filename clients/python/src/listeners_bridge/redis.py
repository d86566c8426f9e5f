"""Redis Pub/Sub broker on `redis.asyncio` (ElastiCache in production: AUTH and TLS)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from listeners_bridge.backoff import reraise_if_cancelled
from listeners_bridge.broker import BrokerUnavailable, Handler, Message
from listeners_bridge.connection import connection_failed, redis_client
from listeners_bridge.redis_subscriber import RedisSubscriber
from listeners_bridge.settings import RedisSettings


class RedisBroker:
    def __init__(self, settings: RedisSettings, on_reconnect: Callable[[str], None] | None = None) -> None:
        self._settings = settings
        self._on_reconnect = on_reconnect  # called with the subscriber's name: the service counts them
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
        on_reconnect = self._on_reconnect

        def counted() -> None:
            if on_reconnect is not None:
                on_reconnect(name)

        return RedisSubscriber(self._settings, name, handler, on_reconnect_count=counted)


def _reason(exc: BaseException) -> str:
    # Exception text from redis-py names host and port, never the password.
    return f"{type(exc).__name__}: {exc}"[:300]
