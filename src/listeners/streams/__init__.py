"""Per-user streams: one source watch and the normaliser, producing envelopes."""
