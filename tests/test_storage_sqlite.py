"""The durable single-machine store (`sqlite://`): the behavioural scenarios shared with the
memory and Redis stores, then what only it does — counters and their windows survive a
restart, a crash loses at most one flush interval, one process per file, its URI forms."""

from __future__ import annotations

import asyncio
import inspect
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import tests.test_storage_redis as shared
from tests.test_storage_redis import Backend, Clock, ref
from tokengateway.limits import counter_scope
from tokengateway.storage import StorageError, StorageURIError, open_store
from tokengateway.storage.sqlite import FLUSH_INTERVAL, SqliteStore, parse_sqlite_uri

NS = shared.NS

# Every scenario of tests/test_storage_redis.py that takes only a `backend` runs here too,
# against the `backend` fixture below (pytest resolves it in this module).
for _name, _scenario in list(vars(shared).items()):
    if _name.startswith("test_") and list(inspect.signature(_scenario).parameters) == ["backend"]:
        globals()[_name] = _scenario
SCENARIOS = [n for n in globals() if n.startswith("test_")]


def test_the_shared_scenarios_are_collected() -> None:
    assert "test_check_and_update_is_all_or_nothing" in SCENARIOS
    assert "test_concurrent_check_and_update_admits_exactly_the_limit" in SCENARIOS


@pytest.fixture
async def backend(tmp_path: Path) -> AsyncIterator[Backend]:
    """A started sqlite store on a fake clock. At the end it is closed and the file opened
    again: whatever the scenario left must come back identical (value and window end)."""
    clock = Clock()
    uri = f"sqlite://{tmp_path}/counters.db"
    store = SqliteStore(uri, clock=clock)
    await store.start()

    async def tick(seconds: float) -> None:
        clock.now += seconds

    try:
        yield Backend("sqlite", store, tick, 1e-6)
        before = sorted(await store.counters())
    finally:
        await store.close()
    again = SqliteStore(uri, clock=clock)
    await again.start()
    try:
        assert sorted(await again.counters()) == before
    finally:
        await again.close()


async def _opened(uri: str, clock: Clock | None = None) -> SqliteStore:
    store = open_store(uri) if clock is None else SqliteStore(uri, clock=clock)
    assert isinstance(store, SqliteStore)
    await store.start()
    return store


# --- restarts --------------------------------------------------------------------------------


async def test_counters_and_their_windows_survive_a_restart_on_the_wall_clock(
    tmp_path: Path,
) -> None:
    uri = f"sqlite://{tmp_path}/c.db"
    month, brief = ref(10**9, 720 * 3600, "u"), ref(100, 2.0, "u")
    store = await _opened(uri)
    written = time.time()
    await store.update([month, brief], [1234, 7])
    await store.update([month], [1])
    await store.close()

    store = await _opened(uri)  # at once: both are back, their windows still running
    got = {k: (v, left) for k, v, left in await store.counters()}
    elapsed = time.time() - written
    assert got[month.key][0] == 1235 and got[brief.key][0] == 7
    assert got[month.key][1] == pytest.approx(720 * 3600 - elapsed, abs=0.5)
    assert got[brief.key][1] == pytest.approx(2.0 - elapsed, abs=0.5)
    assert (await store.check([brief], 94)).limited  # 7 + 94 > 100: the old value counts
    await store.close()

    await asyncio.sleep(max(0.0, written + 2.05 - time.time()))  # the 2 s window ends, offline
    store = await _opened(uri)
    [(key, value, left)] = await store.counters()
    assert (key, value) == (month.key, 1235)
    assert left == pytest.approx(720 * 3600 - (time.time() - written), abs=0.5)
    assert not (await store.check([brief], 100)).limited  # a new window for the brief one
    await store.close()
    rows = sqlite3.connect(tmp_path / "c.db").execute("SELECT key FROM counters").fetchall()
    assert rows == [(month.key,)]  # the expired row was deleted from the file too


async def test_a_restart_restores_exact_values_and_drops_them_as_their_windows_end(
    tmp_path: Path,
) -> None:
    clock = Clock()
    uri = f"sqlite://{tmp_path}/c.db"
    windows = [1.0, 5.0, 2.0, 10.0, 3.0]
    refs = [ref(2**62, w, f"u{i}") for i, w in enumerate(windows)]
    store = await _opened(uri, clock=clock)
    await store.update(refs, [2**60 + i for i in range(len(refs))])  # past what a float holds
    await store.close()
    store = await _opened(uri, clock=clock)
    try:
        got = {k: (v, left) for k, v, left in await store.counters()}
        assert got == {r.key: (2**60 + i, r.window) for i, r in enumerate(refs)}
        tick = ref(10, 100, "tick")
        for t in (1.5, 2.5, 3.5, 5.5, 10.5):  # loaded counters go as their windows end
            clock.now = 1000 + t
            await store.update([tick], [1])
            assert sorted(k for k, _, _ in await store.counters()) == sorted(
                [tick.key] + [r.key for r in refs if r.window > t]
            )
            assert len(store) == 1 + sum(w > t for w in windows)
    finally:
        await store.close()


async def test_changes_are_written_behind_within_the_flush_interval(tmp_path: Path) -> None:
    clock = Clock()
    store = await _opened(f"sqlite://{tmp_path}/c.db", clock=clock)
    try:
        r = ref(100, 60, "u")
        await store.update([r], [5])
        assert _on_disk(tmp_path / "c.db") == {}  # not yet: nothing awaited since the update
        await asyncio.sleep(FLUSH_INTERVAL * 3)
        assert _on_disk(tmp_path / "c.db") == {r.key: (5, 1060.0)}
        for _ in range(20):  # a burst is coalesced into few transactions, each written whole
            await store.check_and_update([r], 1)
        await asyncio.sleep(FLUSH_INTERVAL * 3)
        assert _on_disk(tmp_path / "c.db") == {r.key: (25, 1060.0)}
        assert await store.retain({counter_scope(NS, "other")}) == 1
        await asyncio.sleep(FLUSH_INTERVAL * 3)
        assert _on_disk(tmp_path / "c.db") == {}
    finally:
        await store.close()


def _on_disk(db: Path) -> dict[str, tuple[int, float]]:
    """What a crash now would leave: a copy of the file and its WAL (the lock is advisory
    for plain reads of the bytes), opened apart."""
    copy = db.with_name("crash-copy.db")
    for suffix in ("", "-wal"):
        src = Path(f"{db}{suffix}")
        dst = Path(f"{copy}{suffix}")
        dst.unlink(missing_ok=True)
        if src.exists():
            dst.write_bytes(src.read_bytes())
    con = sqlite3.connect(copy)
    try:
        tables = con.execute("SELECT name FROM sqlite_master WHERE name = 'counters'").fetchall()
        if not tables:
            return {}
        rows = con.execute("SELECT key, value, expires_at FROM counters").fetchall()
        return {k: (v, e) for k, v, e in rows}
    finally:
        con.close()


_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from tokengateway.storage import CounterRef, open_store

    async def main():
        store = open_store(sys.argv[1])
        await store.start()
        await store.update([CounterRef(sys.argv[2], 100, 3600)], [42])
        await asyncio.sleep(0.3)  # a few flush intervals
        print("ready", flush=True)
        await asyncio.sleep(60)  # killed here, never closed

    asyncio.run(main())
    """
)


async def test_another_process_is_refused_and_a_crash_keeps_what_was_flushed(
    tmp_path: Path,
) -> None:
    uri = f"sqlite://{tmp_path}/c.db"
    key = ref(100, 3600, "crash").key
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, uri, key], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        line = await asyncio.to_thread(child.stdout.readline)
        assert line.strip() == "ready"
        with pytest.raises(StorageError) as err:
            await _opened(uri)
        text = str(err.value)
        assert uri in text and "another gateway process" in text and "Redis" in text
    finally:
        child.kill()  # SIGKILL: no close(), no final flush
        child.wait()
    store = await _opened(uri)  # the dead process's lock went with it
    try:
        [(got, value, left)] = await store.counters()
        assert (got, value) == (key, 42) and 3590 < left <= 3600
    finally:
        await store.close()


async def test_a_second_store_on_the_same_file_is_refused_until_the_first_closes(
    tmp_path: Path,
) -> None:
    uri = f"sqlite://{tmp_path}/c.db"
    first = await _opened(uri)
    second = open_store(uri)
    with pytest.raises(StorageError, match="in use by another gateway process"):
        await second.start()
    await first.update([ref(5, 60, "u")], [1])
    await first.close()
    await second.start()
    try:
        assert [v for _, v, _ in await second.counters()] == [1]
    finally:
        await second.close()


async def test_retain_and_counters_persist(tmp_path: Path) -> None:
    uri = f"sqlite://{tmp_path}/c.db"
    kept = [ref(10, 60, "u1"), ref(10, 3600, "u2")]
    dropped = [ref(10, 60, "u1", name="gone"), ref(10, 60, "u1", ns="other/route")]
    store = await _opened(uri)
    await store.update(kept + dropped, [1, 2, 3, 4])
    await store.close()  # all four written
    store = await _opened(uri)
    assert len(await store.counters()) == 4
    assert await store.retain({counter_scope(NS, "lim")}) == 2
    await store.close()
    store = await _opened(uri)
    try:
        got = {k: v for k, v, _ in await store.counters()}
        assert got == {kept[0].key: 1, kept[1].key: 2}
    finally:
        await store.close()


async def test_a_verb_before_start_opens_the_file_and_close_is_idempotent(
    tmp_path: Path,
) -> None:
    store = open_store(f"sqlite://{tmp_path}/c.db")
    assert not (tmp_path / "c.db").exists()  # open_store only validates (as `serve` does)
    await store.update([ref(5, 60, "u")], [2])
    assert (tmp_path / "c.db").exists()
    await store.close()
    await store.close()
    assert _on_disk(tmp_path / "c.db").popitem()[1][0] == 2


# --- URIs ------------------------------------------------------------------------------------


def test_uri_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_sqlite_uri("sqlite:///var/lib/tg/counters.db") == "/var/lib/tg/counters.db"
    assert parse_sqlite_uri("sqlite://counters.db") == str(tmp_path / "counters.db")
    assert parse_sqlite_uri("sqlite://data/c.db") == str(tmp_path / "data" / "c.db")
    assert parse_sqlite_uri("sqlite://./c.db") == str(tmp_path / "c.db")
    store = open_store("sqlite://rel.db")
    assert isinstance(store, SqliteStore)
    assert store.path == str(tmp_path / "rel.db") and store.uri == "sqlite://rel.db"
    monkeypatch.chdir("/")
    assert store.path == str(tmp_path / "rel.db")  # fixed when the store is built


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("sqlite://", "no database file"),
        ("sqlite://c.db?mode=ro", "options"),
        ("sqlite:///tmp/c.db#x", "fragment"),
        ("sqlite://:memory:", "memory://"),
        ("sqlite:///tmp/", "directory"),
    ],
)
def test_bad_uris_are_refused_naming_the_uri(uri: str, message: str) -> None:
    with pytest.raises(StorageURIError, match=message) as err:
        open_store(uri)
    assert repr(uri) in str(err.value)


def test_unknown_schemes_list_sqlite() -> None:
    with pytest.raises(StorageURIError, match=r"sqlite://"):
        open_store("sqlite3:///x.db")


async def test_unusable_files_fail_at_start_naming_the_uri(tmp_path: Path) -> None:
    missing = f"sqlite://{tmp_path}/nowhere/c.db"
    with pytest.raises(StorageError, match="does not exist") as err:
        await open_store(missing).start()
    assert missing in str(err.value)
    (tmp_path / "junk.db").write_bytes(b"this is not a database, " * 100)
    junk = f"sqlite://{tmp_path}/junk.db"
    with pytest.raises(StorageError, match="not a database") as err:
        await open_store(junk).start()
    assert junk in str(err.value)
