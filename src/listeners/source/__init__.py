"""Where changes come from: Firestore watches behind the `SnapshotSource` interface."""
