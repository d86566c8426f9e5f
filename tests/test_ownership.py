"""Rendezvous hashing: balance and minimal movement (pure units)."""

from __future__ import annotations

import math
from collections import Counter

from listeners.cluster import owner

UIDS = [f"user-{n}" for n in range(10_000)]


def test_balanced_at_production_scale() -> None:
    """The spread is statistical: a standard deviation of sqrt(n p (1 - p)) users; four of them
    is never reached by chance, and at these sizes stays well inside the ±20 % asked for."""
    for members in (("a", "b"), ("a", "b", "c"), ("a", "b", "c", "d"), tuple(f"task-{n}" for n in range(10))):
        counts = Counter(owner(uid, members) for uid in UIDS)
        p = 1 / len(members)
        even, sd = len(UIDS) * p, math.sqrt(len(UIDS) * p * (1 - p))
        assert all(abs(c - even) <= min(4 * sd, 0.2 * even) for c in counts.values()), counts


def test_a_join_moves_only_users_to_the_newcomer() -> None:
    before = {uid: owner(uid, ("a", "b", "c")) for uid in UIDS}
    after = {uid: owner(uid, ("a", "b", "c", "d")) for uid in UIDS}
    moved = [uid for uid in UIDS if before[uid] != after[uid]]
    assert all(after[uid] == "d" for uid in moved)
    assert abs(len(moved) - len(UIDS) / 4) <= 0.05 * len(UIDS) / 4


def test_a_leave_moves_only_the_leavers_users() -> None:
    before = {uid: owner(uid, ("a", "b", "c")) for uid in UIDS}
    after = {uid: owner(uid, ("a", "b")) for uid in UIDS}
    assert all(before[uid] == "c" for uid in UIDS if before[uid] != after[uid])


def test_same_answer_whatever_the_order() -> None:
    assert all(owner(uid, ("a", "b", "c")) == owner(uid, ("c", "a", "b")) for uid in UIDS[:500])
