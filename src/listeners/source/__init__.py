"""Where changes come from, and the documents written back: Firestore watches behind the
`SnapshotSource` interface, the Realtime Database clients (`rtdb`, `rtdb_wire`), and the
notification read marks (`stores`). The registry document's shape and its writes are
listeners_bridge.registry's, shared with the bridge."""
