"""Where envelopes go: a small `Broker` interface, Redis and in-memory brokers, the publisher."""
