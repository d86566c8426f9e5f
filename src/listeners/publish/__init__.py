"""Where envelopes go: the `Publisher` (ordered batches over the bridge's `Broker`; every event
confirmed written or its user resynced) and `tails` (tail positions after a stream's last event)."""
