"""bench/tails.py, tiny: 20 users, a few writes, three lost last events.

The benchmark measures the cost of tail positions at 10,000 users and how long a lost last
event takes to heal (`python -m bench.tails`); here only behaviour is asserted: every lost
last event heals through its position and a resync, every position names the newest event
of its stream and no event gets two, and the consumer ends equal to Firestore.
"""

from __future__ import annotations

import argparse
import os

import pytest
from bench import tails

pytestmark = pytest.mark.asyncio


@pytest.mark.timeout(300)  # a guard against a hang: the run itself is well under a minute
async def test_a_lost_last_event_heals_and_bursts_get_one_position(monkeypatch: pytest.MonkeyPatch) -> None:
    # The benchmark points this process's Firestore client at its own emulator: undone after.
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", os.environ.get("FIRESTORE_EMULATOR_HOST", ""))
    args = argparse.Namespace(
        users=20,
        rates=[5.0],
        warmup=[3.0],
        window=8.0,
        drops=3,
        heal_timeout=60.0,
        ready_timeout=120.0,
        seed=1,
        log_level="WARNING",
    )
    r = await tails.run(args)
    assert not r.error, r.error
    assert r.tally is not None
    (phase,) = r.phases
    assert len(phase.drops) == 3
    for drop in phase.drops:
        assert drop.lost_at == drop.lost_at, f"{drop.uid}: its last event was never seen to lose"
        assert drop.healed_at == drop.healed_at, f"{drop.uid}: not healed"
        assert drop.position_at <= drop.asked_at <= drop.healed_at  # position -> gap -> ask -> sync
        assert drop.healed_by == "notif.sync"
    assert r.mismatches == []
    tally = r.tally
    assert tally.positions and tally.unmatched == 0
    # Each position names its stream's newest event, and no event gets two. A burst (events
    # less than QUIET apart on arrival) can still hold two when the first came early: the
    # service counts the quiet from when it took the event, which can reach Redis later.
    assert tally.stale == 0 and tally.repeated == 0
    early = {p.burst for p in tally.positions if p.wait < tails.QUIET}
    assert all(b.positions <= 1 or i in early for i, b in enumerate(tally.bursts))
    assert r.metric_total >= 1
    assert r.write_errors == 0
