"""What the Listen streams say about Firestore as a whole, for /healthz, the metrics and logs.

A stream that a permanent error ended (PERMISSION_DENIED, NOT_FOUND...: `stream.py`) is
degraded until data flows on it again: it is retried slowly, and no watch on it gets anything
meanwhile. The source is degraded while any of its streams is; each change of that state is
logged once.
"""

from __future__ import annotations

import logging

from listeners.metrics import Metrics

log = logging.getLogger(__name__)


class ListenStatus:
    def __init__(self, metrics: Metrics | None = None) -> None:
        self._metrics = metrics
        self._degraded: dict[object, str] = {}  # stream -> why, the latest last

    @property
    def degraded_reason(self) -> str | None:
        """Why no data flows on some streams (the latest error), or None when all serve."""
        if not self._degraded:
            return None
        latest = next(reversed(self._degraded.values()))
        others = len(self._degraded) - 1
        return f"{latest} (and {others} more streams)" if others else latest

    def ended(self, code: str) -> None:
        """A stream's call ended; `code` is a gRPC status name or one of our own few."""
        if self._metrics is not None:
            self._metrics.listen_stream_errors.labels(code).inc()

    def undecodable(self, count: int) -> None:
        if self._metrics is not None:
            self._metrics.listen_undecodable.inc(count)

    def relistened(self, reason: str, targets: int) -> None:
        """Targets listened to again: all of a new call's ("stream"), or one whose existence
        filter disagreed with what it holds ("existence_filter")."""
        if self._metrics is not None and targets:
            self._metrics.listen_relistens.labels(reason).inc(targets)

    def target_failed(self, code: int) -> None:
        """The server removed a target with an error (google.rpc.Code, 0-16; any other number is
        counted as "other", so that the server cannot grow the label set)."""
        if self._metrics is not None:
            self._metrics.listen_target_errors.labels(str(code) if 0 <= code <= 16 else "other").inc()

    def probed(self, answered: bool) -> None:
        """A quiet stream was asked a question; unanswered, its connection is replaced."""
        if self._metrics is not None:
            self._metrics.listen_probes.labels("answered" if answered else "unanswered").inc()

    def degraded(self, stream: object, reason: str) -> None:
        first = not self._degraded
        self._degraded.pop(stream, None)
        self._degraded[stream] = reason
        if first:
            log.error("firestore listen degraded", extra={"reason": reason})
        self._gauge()

    def recovered(self, stream: object, why: str) -> None:
        if self._degraded.pop(stream, None) is None:
            return
        if not self._degraded:
            log.info("firestore listen recovered", extra={"reason": why})
        self._gauge()

    def _gauge(self) -> None:
        if self._metrics is not None:
            self._metrics.listen_degraded.set(len(self._degraded))
