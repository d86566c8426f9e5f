"""Where envelopes go: a small `Broker` interface, Redis and in-memory brokers, the publisher,
and the channel names (`channels`) every publisher and subscriber uses."""
