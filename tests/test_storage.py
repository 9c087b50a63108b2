"""The in-memory counter store: fixed windows, check/update verbs, bounded memory."""

import pytest

from tokengateway.storage import CounterRef, MemoryStore, StorageURIError, open_store


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(clock: Clock) -> MemoryStore:
    return MemoryStore(clock=clock)


REF = CounterRef("ns\x1flimit\x1f60000\x1fuser-1", limit=50, window=60.0)


async def test_check_adds_nothing_and_refuses_only_past_the_limit(store: MemoryStore) -> None:
    result = await store.check([REF], 1)
    assert not result.limited
    assert result.states[0].value == 0
    assert result.states[0].remaining == 50
    await store.update([REF], [49])
    assert not (await store.check([REF], 1)).limited  # 49 + 1 > 50 is false
    await store.update([REF], [1])
    spent = await store.check([REF], 1)
    assert spent.limited and spent.limiting == 0
    assert spent.states[0].value == 50


async def test_update_is_unchecked_so_a_report_can_overshoot(store: MemoryStore) -> None:
    await store.update([REF], [120])
    assert store.snapshot()[REF.key][0] == 120


async def test_window_opens_at_first_report_and_expires(store: MemoryStore, clock: Clock) -> None:
    await store.update([REF], [50])
    clock.now += 30
    result = await store.check([REF], 1)
    assert result.limited
    assert result.retry_after == pytest.approx(30.0)
    clock.now += 30
    assert not (await store.check([REF], 1)).limited
    await store.update([REF], [5])  # a new window starts with this report
    assert store.snapshot()[REF.key] == (5, pytest.approx(60.0))


async def test_check_and_update_is_all_or_nothing(store: MemoryStore) -> None:
    small = CounterRef("a", limit=2, window=10)
    big = CounterRef("b", limit=100, window=10)
    assert not (await store.check_and_update([small, big], 1)).limited
    assert not (await store.check_and_update([small, big], 1)).limited
    refused = await store.check_and_update([small, big], 1)
    assert refused.limited and refused.limiting == 0
    assert store.snapshot()["b"][0] == 2  # the refused request added to neither


async def test_expired_counters_are_dropped(store: MemoryStore, clock: Clock) -> None:
    for i in range(1000):
        await store.update([CounterRef(f"user-{i}", 10, 1.0)], [1])
    assert len(store) == 1000
    clock.now += 2
    await store.update([CounterRef("late", 10, 1.0)], [1])
    assert len(store) == 1


async def test_limiting_counter_is_the_one_reopening_last(store: MemoryStore, clock: Clock) -> None:
    minute = CounterRef("m", limit=1, window=60)
    hour = CounterRef("h", limit=1, window=3600)
    await store.update([minute, hour], [1, 1])
    result = await store.check([minute, hour], 1)
    assert result.limited
    assert result.retry_after == pytest.approx(3600)


def test_open_store_by_uri() -> None:
    assert isinstance(open_store("memory://"), MemoryStore)
    with pytest.raises(StorageURIError, match=r"unknown scheme 'foo'.*memory://"):
        open_store("foo://bar")
    with pytest.raises(StorageURIError, match="takes no host"):
        open_store("memory://somewhere")
