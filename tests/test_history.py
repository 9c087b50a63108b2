"""The control plane's history (controlplane/history.py): versions, events, the bounded ring
and its 410, waking a waiter from another thread."""

from __future__ import annotations

import asyncio
import threading

import pytest

from tokengateway.controlplane.history import Expired, History


def obj(name: str, **status: str) -> dict:
    return {"kind": "K", "metadata": {"name": name}, "status": dict(status)}


def test_events_versions_and_expiry() -> None:
    history = History(start=100, size=3)
    start = history.last
    added = history.record({("K", "", "a"): obj("a"), ("K", "", "b"): obj("b")})
    assert [(e.type, e.version) for e in added] == [("ADDED", start + 1), ("ADDED", start + 2)]
    assert history.record({("K", "", "a"): obj("a"), ("K", "", "b"): obj("b")}) == []
    changed = history.record({("K", "", "a"): obj("a", phase="Enforced")})  # b deleted
    assert [(e.type, e.key[2]) for e in changed] == [("MODIFIED", "a"), ("DELETED", "b")]
    assert changed[1].object["metadata"]["resourceVersion"] == str(start + 4)
    assert history.objects()[("K", "", "a")]["metadata"]["resourceVersion"] == str(start + 3)
    # four events, three kept: from `start` the first is gone
    with pytest.raises(Expired):
        history.since(start)
    last, events = history.since(start + 1)
    assert last == start + 4 and [e.version for e in events] == [start + 2, start + 3, start + 4]


def test_a_start_from_before_a_restart_wins_over_the_clock() -> None:
    far = 10**18
    assert History(start=far).last == far
    assert History(start=5).last > 5  # the clock, in microseconds


def test_a_record_from_another_thread_wakes_a_waiter() -> None:
    history = History()

    async def main() -> None:
        with history.waiter() as waiter:
            threading.Timer(0.1, history.record, args=({("K", "", "a"): obj("a")},)).start()
            await asyncio.wait_for(waiter.event.wait(), 5)

    asyncio.run(main())
