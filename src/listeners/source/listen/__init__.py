"""A multiplexed Firestore Listen client on grpc.aio: many query targets per stream, a few
streams per connection, no thread per watch (issue 13)."""

from listeners.source.listen.source import ListenSource

__all__ = ["ListenSource"]
