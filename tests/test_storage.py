"""The in-memory counter store: fixed windows, check/update verbs, bounded memory."""

import random

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


# --- how counters are kept: exact values, windows ending in any order, bounded memory ------


async def test_values_stay_exact_past_what_a_float_holds(store: MemoryStore) -> None:
    big = CounterRef("ns\x1flimit\x1f60000\x1fbig", limit=2**62, window=60.0)
    await store.update([big], [2**53 - 1])
    await store.update([big], [1])  # 2**53: the first integer a float rounds past
    await store.update([big], [1])
    assert store.snapshot()[big.key][0] == 2**53 + 1
    await store.update([big], [-(2**53)])  # and back within range
    assert store.snapshot()[big.key][0] == 1
    huge = CounterRef("ns\x1flimit\x1f60000\x1fhuge", limit=10, window=60.0)
    await store.update([huge], [10**400])  # past any float
    await store.update([huge], [3])
    assert store.snapshot()[huge.key][0] == 10**400 + 3
    assert (await store.check([huge], 1)).states[0].value == 10**400 + 3
    negative = CounterRef("ns\x1flimit\x1f60000\x1fneg", limit=10, window=60.0)
    await store.update([negative], [-5])
    await store.update([negative], [2])
    result = await store.check_and_update([negative], 12)  # -3 + 12 <= 10
    assert not result.limited and result.states[0].value == -3
    assert [v for k, v, _ in await store.counters() if k == negative.key] == [9]


async def test_update_with_mismatched_deltas_changes_nothing(store: MemoryStore) -> None:
    a, b = CounterRef("a", 10, 60), CounterRef("b", 10, 60)
    with pytest.raises(ValueError):
        await store.update([a, b], [1])
    with pytest.raises(ValueError):
        await store.commit([a, b], [1, 2, 3], "rid")
    assert store.snapshot() == {}


async def test_windows_that_end_out_of_order_are_dropped_in_time(
    store: MemoryStore, clock: Clock
) -> None:
    # a clock that steps back: counters of one window length no longer end in the order
    # they were opened
    long, short = CounterRef("k1", 10, 100.0), CounterRef("k2", 10, 100.0)
    await store.update([long], [1])  # ends at 1100
    clock.now -= 50  # the clock steps back
    await store.update([short], [1])  # ends at 1050, opened after one ending at 1100
    await store.update([CounterRef("k3", 10, 10.0)], [1])  # ends at 960
    assert len(store) == 3
    clock.now = 1050
    await store.update([CounterRef("x", 10, 1000.0)], [1])
    assert sorted(store.snapshot()) == ["k1", "x"]
    assert len(store) == 2  # k2 and k3 are gone, not kept behind k1
    clock.now = 1100
    await store.update([CounterRef("x", 10, 1000.0)], [1])
    assert len(store) == 1


async def test_memory_stays_bounded_over_many_windows(store: MemoryStore, clock: Clock) -> None:
    minute = [CounterRef(f"ns\x1fl\x1f60000\x1fu{i}", 1000, 60.0) for i in range(50)]
    hour = [CounterRef(f"ns\x1fl\x1f3600000\x1fu{i}", 1000, 3600.0) for i in range(5)]
    loose = [CounterRef(f"k{i}", 1000, float(1 + i % 7)) for i in range(20)]
    for step in range(2000):  # about 33 hours, a write every minute
        clock.now += 59.7
        if step % 97 == 0:
            clock.now -= 30  # now and then the clock steps back
        refs = [*minute[step % 3 :: 3], *hour, loose[step % 20]]
        await store.update(refs, [1] * len(refs))
        assert len(store) == len(store.snapshot())  # nothing ended is kept
        assert len(store) <= len(minute) + len(hour) + len(loose)
        assert len(store._due) <= 10 and len(store._strays) <= len(store)
    assert len(store._orders) <= 10


async def test_a_removed_limit_that_comes_back_does_not_hold_up_expiry(
    store: MemoryStore, clock: Clock
) -> None:
    gone = CounterRef("ns/r\x1fp/gone\x1f60000\x1fu", 10, 60.0)
    kept = [CounterRef(f"ns/r\x1fp/kept\x1f60000\x1fu{i}", 10, 60.0) for i in range(3)]
    await store.update([gone, *kept], [1, 1, 1, 1])
    assert await store.retain({"ns/r\x1fp/kept"}) == 1
    clock.now += 30
    await store.update([gone], [1])  # back, with a window ending at 1090
    clock.now += 31  # the others ended at 1060
    await store.update([CounterRef("other", 10, 600.0)], [1])
    assert sorted(store.snapshot()) == sorted([gone.key, "other"])
    assert len(store) == 2


async def test_holds_go_with_their_counter(store: MemoryStore, clock: Clock) -> None:
    r = CounterRef("ns\x1flimit\x1f1000\x1fu", 100, 1.0)
    assert not (await store.reserve([r], [60], [30.0], "rid")).limited
    assert store._held_on(r.key, clock.now) == 60
    clock.now += 2
    await store.update([CounterRef("other", 10, 60.0)], [1])  # drops r, and its hold
    assert store._held == {}
    assert (await store.reserve([r], [60], [30.0], "next")).states[0].held == 0


async def test_against_a_model_with_windows_in_any_order(clock: Clock) -> None:
    """Random writes, checks, clock steps (back too) and retains on keys of several shapes
    and windows: the store answers as a dict of (value, window end) would, and after every
    write holds no counter that has ended."""
    rng = random.Random(7)
    store = MemoryStore(clock=clock)
    keys = ["a", "b\x1fc", "ns\x1fp/l\x1f1000\x1fu", "ns\x1fp/l\x1f1000\x1fu\x1fv", "ns\x1fq\x1f5"]
    refs = [CounterRef(k, 20, w) for k in keys for w in (0.5, 1.0, 3.0)]
    model: dict[str, tuple[int, float]] = {}

    def live(key: str) -> tuple[int, float] | None:
        got = model.get(key)
        return got if got is not None and got[1] > clock.now else None

    def sweep() -> None:  # what a write does first: a clock stepping back revives nothing
        for key in [k for k, (_, end) in model.items() if end <= clock.now]:
            del model[key]

    def add(ref: CounterRef, delta: int) -> None:
        got = live(ref.key)
        model[ref.key] = (
            (delta, clock.now + ref.window) if got is None else (got[0] + delta, got[1])
        )

    for _ in range(3000):
        op = rng.random()
        chosen = rng.sample(refs, rng.randint(1, 3))
        delta = rng.randint(0, 8)
        wrote = False
        if op < 0.2:
            clock.now += rng.choice([0.1, 0.3, 0.7, 1.5, -0.4])
        elif op < 0.5:
            await store.update(chosen, [delta] * len(chosen))
            sweep()
            for ref in chosen:
                add(ref, delta)
            wrote = True
        elif op < 0.9:
            result = await store.check_and_update(chosen, delta)
            values = [got[0] if (got := live(r.key)) else 0 for r in chosen]
            assert [s.value for s in result.states] == values
            limited = any(v + delta > r.limit for v, r in zip(values, chosen, strict=True))
            assert result.limited == limited
            if not limited:
                sweep()
                for ref in chosen:
                    add(ref, delta)
                wrote = True
        else:
            keep = {"ns\x1fp/l"} if rng.random() < 0.5 else {"a", "b\x1fc"}
            held = [k for k in store._counters if _scope_of(k) not in keep]  # ended or not
            assert await store.retain(keep) == len(held)
            for key in [k for k in model if _scope_of(k) not in keep]:
                del model[key]
        expected = {k: (v, end - clock.now) for k, (v, end) in model.items() if end > clock.now}
        assert store.snapshot() == expected
        if wrote:
            assert len(store) == len(expected)  # a write drops every counter that ended


def _scope_of(key: str) -> str:
    return "\x1f".join(key.split("\x1f", 2)[:2])
