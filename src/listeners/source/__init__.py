"""Where changes come from, and the documents written back: Firestore watches behind the
`SnapshotSource` interface, the Realtime Database client, the registry document's shape
(`registry`) and the stores that write documents (`stores`)."""
