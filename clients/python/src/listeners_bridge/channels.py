"""Redis channel names, the one place they are spelt: a user's `{prefix}{uid}` and a chat
thread's `{chat_prefix}{uid}:{space_code}:{thread_key}`. The service publishes on them; the
bridge and the WebSocket hub subscribe to the same names."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from listeners_bridge.registry import ChatThread
    from listeners_bridge.settings import RedisSettings


@dataclass(frozen=True)
class Channels:
    prefix: str = "user:"
    chat_prefix: str = "chat:"

    @classmethod
    def of(cls, redis: RedisSettings) -> Channels:
        """The names these settings give (`LISTENERS_CHANNEL_PREFIX`, `LISTENERS_CHAT_CHANNEL_PREFIX`)."""
        return cls(redis.channel_prefix, redis.chat_channel_prefix)

    def user(self, uid: str) -> str:
        return f"{self.prefix}{uid}"

    def chat(self, uid: str, thread: ChatThread) -> str:
        return f"{self.chat_prefix}{uid}:{thread.space_code}:{thread.thread_key}"

    def of_user(self, uid: str, threads: Iterable[ChatThread] = ()) -> list[str]:
        """The user's channel, then those of these threads."""
        return [self.user(uid), *(self.chat(uid, t) for t in threads)]
