"""Which instance serves which user: rendezvous hashing over a membership kept in Redis.

Every instance heartbeats its id into the sorted set `listeners:members`, scored with its
expiry in Redis's own clock (`TIME`), so instance clocks never enter the decision. The
live members are those not yet expired; the owner of a user is the member with the
highest hash of (member, uid). Each instance computes the same answer from the same
view, and a change of membership moves only the users of the member that came or went.
After Redis restarted or could not be reached, every member known before is kept for
`GRACE_TTLS` TTLs: the others' entries may have expired only because they could not reach
Redis either.

Changes are announced on the channel `listeners:members:changes`, so a join or a clean
leave is seen at once; a killed instance is noticed when its entry expires. If Redis
cannot be reached, the last view is kept: an instance keeps serving what it owns and
nothing flaps. docs/scaling.md has the failure analysis.

Each entry is `{instance_id}#{nonce}`, the nonce drawn afresh by every process, so two
processes started with the same id are told apart. A process joins only when no other live
process holds its id: one that finds its id held (the other's entry is renewed while it
waits) raises `IdentityConflict` and never serves; one whose id was held by a process that
died waits until that entry expires (one TTL), then the id is free. Ownership hashes the ids,
never the nonces.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
from collections.abc import Callable

import redis.asyncio as redis
from redis.exceptions import RedisError

from listeners.config import RedisSettings
from listeners.supervisor import Fatal
from listeners_bridge.backoff import Backoff, reraise_if_cancelled
from listeners_bridge.broker import Broker
from listeners_bridge.connection import close_quietly, connection_failed, redis_client
from listeners_bridge.waits import wait_event

log = logging.getLogger(__name__)

MEMBERS_KEY = "listeners:members"
CHANGES_CHANNEL = "listeners:members:changes"
NONCE_SEPARATOR = "#"
# After a Redis restart or an outage, members are kept this many TTLs: a heartbeat stuck on a
# dead connection fails after half a TTL, and a new connection and a beat take some more.
GRACE_TTLS = 2.0


class IdentityConflict(Fatal):
    """Another live process holds this instance id: this one must not serve."""


def entry_id(entry: str) -> str:
    """The instance id of a membership entry (`id#nonce`; an entry without a nonce is its id)."""
    return entry.rpartition(NONCE_SEPARATOR)[0] or entry


def score(member: str, uid: str) -> int:
    digest = hashlib.blake2b(f"{member}\x00{uid}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def owner(uid: str, members: tuple[str, ...]) -> str:
    return max(members, key=lambda member: (score(member, uid), member))


class Membership:
    def __init__(
        self,
        settings: RedisSettings,
        instance_id: str,
        *,
        broker: Broker,
        ttl_seconds: float = 3.0,
        beat_seconds: float = 0.5,
    ) -> None:
        self._settings = settings
        # Joins and leaves, announced: look now rather than at the next beat.
        self._changes = broker.subscriber("membership", lambda channel, data: self._changed.set())
        self.instance_id = instance_id
        self.nonce = secrets.token_hex(8)
        self.entry = f"{instance_id}{NONCE_SEPARATOR}{self.nonce}"
        self.joined = False  # no other live process held our id when we joined: we may serve
        self.conflict: str | None = None  # why we refused to serve, once we have
        self._rivals: dict[str, float] = {}  # other processes' entries for our id: their expiry
        self._ttl = ttl_seconds
        self._beat = beat_seconds
        self.members: tuple[str, ...] = (instance_id,)  # alone until Redis says otherwise
        self._listeners: list[Callable[[], None]] = []
        self._changed = asyncio.Event()
        self._left = False
        self._grace_until = 0.0
        self._cut_off = False  # a heartbeat failed: the next view that succeeds starts a grace
        self._stopped = asyncio.Event()
        self.ready = asyncio.Event()  # set after the first heartbeat: the view is Redis's
        self._backoff = Backoff()

    @property
    def contested(self) -> bool:
        """Not joined yet: another process's entry for our id is still there."""
        return not self.joined and bool(self._rivals) and self.conflict is None

    @property
    def ttl_seconds(self) -> float:
        return self._ttl

    def owns(self, uid: str) -> bool:
        """Nothing before we joined (our id may be another process's) nor after a conflict."""
        if not self.joined or self.conflict is not None:
            return False
        return owner(uid, self.members) == self.instance_id

    def on_change(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    async def run(self) -> None:
        """Heartbeat and watch, for as long as the instance runs; never raises on Redis trouble."""
        # The command timeout stays below the TTL: a heartbeat stuck on a dead connection
        # fails, and the next one makes a new connection before our entry expires.
        client = redis_client(self._settings, timeout=min(5.0, self._ttl / 2))
        await self._changes.subscribe(CHANGES_CHANNEL)
        watcher = asyncio.create_task(self._changes.run(), name="membership-changes")
        failures = 0
        try:
            while not self._left:
                try:
                    await self._heartbeat(client)
                    failures = 0
                except Exception as exc:
                    reraise_if_cancelled()
                    if not connection_failed(exc):
                        raise
                    failures += 1
                    self._cut_off = True
                    if failures == 1:
                        log.warning(
                            "membership: redis unreachable, keeping the last view",
                            extra={"reason": type(exc).__name__},
                        )
                self._changed.clear()
                await wait_event(self._changed, self._beat)
        finally:
            # Whatever ended this run, the supervisor may start another: it must begin as after
            # an outage, keeping every member it knew for a grace, or it would take their users.
            self._cut_off = True
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            await close_quietly(client)
            self._stopped.set()
        await asyncio.Event().wait()  # left: nothing more to do, until the service stops us

    async def _heartbeat(self, client: redis.Redis) -> None:
        seconds, micros = await client.time()
        now = seconds + micros / 1_000_000
        async with client.pipeline(transaction=False) as pipe:
            pipe.zadd(MEMBERS_KEY, {self.entry: now + self._ttl})
            pipe.zremrangebyscore(MEMBERS_KEY, "-inf", now)
            pipe.zrange(MEMBERS_KEY, 0, -1, withscores=True)
            added, expired, entries = await pipe.execute()
        if expired:
            # A member died (its entry expired): whoever removes it tells the others, so that
            # every instance takes over its share now rather than at its own next look.
            await client.publish(CHANGES_CHANNEL, "expired")
        if self._left:
            return  # leave() ran meanwhile: do not come back
        names = [name.decode() for name, _ in entries]
        rivals = {
            name: float(expiry)
            for name, expiry in ((n.decode(), e) for n, e in entries)
            if entry_id(name) == self.instance_id and name != self.entry
        }
        if not self.joined or added:
            # Joining, or back after our entry was gone: the id must not be another live
            # process's. Each of two processes joining at once reads after its own write, so
            # at least one of them sees the other: never do both serve.
            if self._contested(rivals):
                await self._refuse(client, rivals)
                return
            if rivals:
                self._rivals = rivals
                return  # held by a process that may be dead: wait for its entry to expire
            if not self.joined:
                log.info("membership: joined", extra={"instance_id": self.instance_id, "nonce": self.nonce})
            self.joined = True
        elif rivals and set(rivals) - set(self._rivals):
            log.warning(
                "membership: another process tried to join with this instance id; it must refuse",
                extra={"instance_id": self.instance_id, "entries": sorted(rivals)},
            )
        self._rivals = rivals
        found = {entry_id(n) for n in names} | {self.instance_id}
        if added:  # our entry was new: we joined, or came back; tell the others now
            await client.publish(CHANGES_CHANNEL, self.instance_id)
        if self.ready.is_set() and (added or self._cut_off):
            # Our own entry was gone (Redis restarted empty), or we could not reach Redis for
            # a while: then neither, perhaps, could the others, and their entries expired for
            # that alone. Each re-adds its own once its stuck command has timed out and a new
            # connection is made; until then nobody known is dropped, or the first instance
            # back would take every user for a moment and hand them back (a storm of syncs
            # in two epochs). A member that really died goes when the grace ends.
            self._grace_until = time.monotonic() + GRACE_TTLS * self._ttl
        self._cut_off = False
        if time.monotonic() < self._grace_until:
            found |= set(self.members)
        first = not self.ready.is_set()
        self.ready.set()
        members = tuple(sorted(found))
        if members != self.members or first:
            log.info("membership changed", extra={"members": list(members)})
            self.members = members
            for callback in list(self._listeners):
                try:
                    callback()
                except Exception:  # the heartbeat must go on whatever a listener does
                    log.exception("membership listener failed")

    def _contested(self, rivals: dict[str, float]) -> bool:
        """A rival is live if it renewed its entry since we first saw it, or if we held the
        id and lost our entry (cut off past the TTL, or Redis restarted) while it joined."""
        if rivals and self.joined:
            return True
        return any(expiry > self._rivals.get(name, expiry) for name, expiry in rivals.items())

    async def _refuse(self, client: redis.Redis, rivals: dict[str, float]) -> None:
        self.conflict = (
            f"instance id {self.instance_id!r} is held by another live process "
            f"({', '.join(sorted(rivals))}); this process ({self.entry}) will not serve. "
            "Give every process its own LISTENERS_INSTANCE_ID, or leave it unset."
        )
        log.error("membership: instance id in use, refusing to serve", extra={"reason": self.conflict})
        self._left = True
        was_serving = self.joined
        self.joined = False
        with contextlib.suppress(RedisError, OSError, RuntimeError):
            await client.zrem(MEMBERS_KEY, self.entry)
        self.ready.set()
        if was_serving:
            for callback in list(self._listeners):  # let go of every user at once
                with contextlib.suppress(Exception):
                    callback()
        raise IdentityConflict(self.conflict)

    async def leave(self) -> None:
        """A clean stop: leave at once and tell the others, so they take over now."""
        self._left = True
        self._changed.set()
        await wait_event(self._stopped, 2.0)  # no heartbeat in flight may add us back
        client = redis_client(self._settings, timeout=2.0)
        try:
            await client.zrem(MEMBERS_KEY, self.entry)
            await client.publish(CHANGES_CHANNEL, self.instance_id)
        except Exception as exc:
            reraise_if_cancelled()
            if not connection_failed(exc):
                raise
            log.warning("membership: could not leave cleanly", extra={"reason": type(exc).__name__})
        finally:
            await close_quietly(client)
