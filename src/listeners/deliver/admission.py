"""Cheap refusals: what is decided about a WebSocket upgrade before it is accepted (issue 28).

An upgrade that will be refused anyway is refused with a plain HTTP status before the
handshake: no `101`, no permessage-deflate negotiated, no application task, no socket held
open waiting for a token. deliver.wsprotocol asks `Admission.admit` as soon as the request is
parsed (before uvicorn's `accept`, which negotiates deflate); under another ASGI server the
gateway asks it before `websocket.accept` and answers with the ASGI `websocket.http.response`
extension. In order:

1. the instance is shutting down: 503;
2. the caller's handshake rate (`LISTENERS_WS_HANDSHAKES_PER_SECOND_PER_ADDRESS`, bursts of
   `LISTENERS_WS_HANDSHAKE_BURST_PER_ADDRESS`) is spent: 429 with `Retry-After`, which
   deliver.httpprotocol answers late (`Admission.hold`);
3. the upgrade carries no token (`?token=` or `Sec-WebSocket-Protocol: bearer, <token>`) and
   its origin may not authenticate by a first `auth` message
   (`LISTENERS_WS_FIRST_MESSAGE_AUTH_ORIGINS`, empty by default): 401;
4. the caller already has `LISTENERS_WS_MAX_UNAUTHENTICATED_PER_ADDRESS` sockets still
   authenticating: 429 with `Retry-After`;
5. the instance is full (sockets still authenticating, or authenticated ones): 503 with
   `Retry-After`.

An admitted upgrade holds a `Ticket` until its token is verified or refused (or the
connection ends): that is what counts as "still authenticating", per address and in all.
The caller's address is deliver.clients'. Each refusal counts in
`listeners_ws_refusals_total{reason}` and is logged, sampled: the first of a reason, then at
most one line per `LOG_EVERY_SECONDS` with how many were not logged.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from listeners.config import WebSocketSettings
from listeners.deliver.clients import client_address, networks

log = logging.getLogger(__name__)

ADMISSION_STATE = "listeners.admission"  # the lifespan state key: deliver.wsprotocol finds it there
TICKET_EXTENSION = "listeners.ticket"  # an admitted upgrade's ticket, in the scope's extensions
LOG_EVERY_SECONDS = 10.0
FULL_RETRY_SECONDS = 5
EVICTION_SCAN = 64  # addresses looked at to find an idle one to forget

# Refusal reasons: the metric's label values.
CLOSING = "closing"
RATE = "rate"
NO_TOKEN = "no_token"
ADDRESS_UNAUTHENTICATED = "address_unauthenticated"
FULL = "full"
REASONS = (CLOSING, RATE, NO_TOKEN, ADDRESS_UNAUTHENTICATED, FULL)


@dataclass(frozen=True)
class Refusal:
    status: int
    reason: str
    text: str
    retry_after: int | None = None

    def headers(self) -> list[tuple[str, str]]:
        return [("Retry-After", str(self.retry_after))] if self.retry_after is not None else []


class GatewayState(Protocol):
    closing: bool
    authenticated: int


class _Source:
    """One client address: its handshake bucket and its sockets still authenticating."""

    __slots__ = ("pending", "refilled", "tokens")

    def __init__(self, tokens: float, now: float) -> None:
        self.tokens = tokens
        self.refilled = now
        self.pending = 0


class Ticket:
    """An admitted upgrade, until its token is settled; `release` is idempotent."""

    __slots__ = ("_admission", "_source", "address")

    def __init__(self, admission: Admission, source: _Source, address: str) -> None:
        self._admission: Admission | None = admission
        self._source = source
        self.address = address

    def release(self) -> None:
        if self._admission is None:
            return
        self._source.pending -= 1
        self._admission.pending -= 1
        self._admission = None


class SampledLog:
    """A warning per reason: the first, then at most one line per `LOG_EVERY_SECONDS`, which
    says how many were not logged (`not_logged`)."""

    def __init__(self, logger: logging.Logger, message: str) -> None:
        self.logger = logger
        self.message = message
        self._logged: dict[str, tuple[float, int]] = {}  # reason: (last line, not logged since)

    def __call__(self, reason: str, **extra: Any) -> None:
        now = time.monotonic()
        last, since = self._logged.get(reason, (-math.inf, 0))
        if now - last >= LOG_EVERY_SECONDS:
            self.logger.warning(self.message, extra={"reason": reason, **extra, "not_logged": since})
            self._logged[reason] = (now, 0)
        else:
            self._logged[reason] = (last, since + 1)


def carries_token(query_string: str, subprotocols: str) -> bool:
    """As the gateway reads a token from the upgrade: `bearer, <token>`, or a non-empty `?token=`."""
    parts = [p.strip() for p in subprotocols.split(",")]
    if len(parts) == 2 and parts[0] == "bearer" and parts[1]:
        return True
    return bool(urllib.parse.parse_qs(query_string).get("token"))


class Admission:
    def __init__(
        self,
        settings: WebSocketSettings,
        state: GatewayState,
        count: Callable[[str], None] = lambda reason: None,
        path: str = "/ws",
    ) -> None:
        self.settings = settings
        self.path = path
        self._state = state
        self._count = count
        self._trusted = networks(settings.trusted_proxy_cidrs)
        self._first_message = frozenset(settings.first_message_auth_origins)
        self._rate = settings.handshakes_per_second_per_address
        self._burst = float(settings.handshake_burst_per_address)
        self._sources: OrderedDict[str, _Source] = OrderedDict()
        self.pending = 0  # admitted, token not settled yet: every address
        self.held = 0  # rate refusals whose answer deliver.httpprotocol holds back for now
        self.refused: dict[str, int] = dict.fromkeys(REASONS, 0)
        self._log = SampledLog(log, "websocket refused before the upgrade")
        self._rate_retry = max(1, math.ceil(1 / self._rate))
        self._pending_retry = max(1, math.ceil(settings.unauthenticated_timeout_seconds))

    def guards(self, path: str) -> bool:
        """Whether an upgrade to this path (query included) is the gateway's."""
        return path.partition("?")[0] == self.path

    def first_message_allowed(self, origin: str | None) -> bool:
        return "*" in self._first_message or (origin is not None and origin in self._first_message)

    def admit(
        self, peer: str, forwarded_for: str | None, origin: str | None, has_token: bool
    ) -> Ticket | Refusal:
        if self._state.closing:
            return self._refuse(CLOSING, 503, "shutting down", FULL_RETRY_SECONDS, peer)
        address = client_address(peer, forwarded_for, self._trusted)
        source = self._source(address)
        now = time.monotonic()
        source.tokens = min(self._burst, source.tokens + (now - source.refilled) * self._rate)
        source.refilled = now
        if source.tokens < 1:
            return self._refuse(RATE, 429, "too many connection attempts", self._rate_retry, address)
        source.tokens -= 1
        if not has_token and not self.first_message_allowed(origin):
            return self._refuse(NO_TOKEN, 401, "a token is needed in the upgrade", None, address)
        if source.pending >= self.settings.max_unauthenticated_per_address:
            return self._refuse(
                ADDRESS_UNAUTHENTICATED, 429, "too many sockets authenticating", self._pending_retry, address
            )
        if (
            self.pending >= self.settings.max_unauthenticated_sockets
            or self._state.authenticated >= self.settings.max_sockets
        ):
            return self._refuse(FULL, 503, "instance full", FULL_RETRY_SECONDS, address)
        source.pending += 1
        self.pending += 1
        return Ticket(self, source, address)

    def hold(self, refusal: Refusal) -> float:
        """Seconds to hold back the answer to this refusal (0: answer at once), with a place
        among the `max_delayed_refusals` taken until `unhold`. Only a caller over its
        handshake rate is held: one that reconnects as soon as it is answered then makes a
        few attempts a second instead of as many as the service can answer, and its attempts,
        each held a random time, no longer come back in waves."""
        delay = self.settings.rate_refusal_delay_seconds
        if refusal.reason != RATE or not delay or self.held >= self.settings.max_delayed_refusals:
            return 0.0
        self.held += 1
        return delay * random.uniform(0.5, 1.5)

    def unhold(self) -> None:
        self.held -= 1

    def _source(self, address: str) -> _Source:
        sources = self._sources
        source = sources.get(address)
        if source is not None:
            sources.move_to_end(address)
            return source
        while len(sources) >= self.settings.tracked_addresses:
            # The least recently seen idle address is forgotten (its bucket starts full again).
            # When the oldest few all have sockets authenticating, the oldest goes all the same:
            # the bound holds, its tickets keep their own count, and the instance's cap on
            # unauthenticated sockets still bounds them.
            oldest = itertools.islice(sources.items(), EVICTION_SCAN)
            idle = next((old for old, candidate in oldest if candidate.pending == 0), None)
            del sources[idle if idle is not None else next(iter(sources))]
        source = sources[address] = _Source(self._burst, time.monotonic())
        return source

    @property
    def tracked(self) -> int:
        return len(self._sources)

    def _refuse(self, reason: str, status: int, text: str, retry_after: int | None, address: str) -> Refusal:
        self.refused[reason] += 1
        self._count(reason)
        self._log(reason, status=status, address=address[:80])
        return Refusal(status, reason, text, retry_after)
