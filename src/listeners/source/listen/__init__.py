"""A multiplexed Firestore Listen client on grpc.aio: many query targets per stream, a few
streams per connection, no thread per watch (issue 13).

The modules, each importing only those after it: `source` (`ListenSource`, the
`SnapshotSource`, and its watches), `pool` (connections and the streams on them), `stream`
(`ListenStream`: one call of the Listen RPC, a gRPC bidirectional stream, carrying many
targets; not a user's event stream, `listeners.streams`), `protocol` (the targets' state, pure
logic), `convert` and `wire` (the raw protobuf messages), `status` (degraded or not). What a
stream needs of its connection and of its watches it names as protocols (`stream.Link`,
`stream.Watcher`), so it imports neither `pool` nor `source`.
"""

from listeners.source.listen.source import ListenSource

__all__ = ["ListenSource"]
