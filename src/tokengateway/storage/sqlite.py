"""Durable counters for one machine (`sqlite:///absolute/path.db`, `sqlite://relative/path.db`).

The request path never waits for the disk: the live counters are the in-memory store's (same
verbs, same atomicity: nothing awaits inside a verb), timed by the wall clock (`time.time()`)
so that a window's end still means something after a restart. Every counter a verb changes is
marked dirty; a background task started by `start()` writes the dirty counters to SQLite at
most every `flush_interval` (100 ms), one transaction per flush, and `close()` writes the
rest. `start()` loads the counters whose windows have not ended.

Durability: a clean stop (`close()`) loses nothing; a process crash (kill -9, OOM) loses at
most the changes of the last flush interval. WAL with `synchronous=NORMAL` may also lose the
last transactions to a power loss or OS crash, never the file's consistency.

One process per database file: the connection takes SQLite's exclusive lock
(`locking_mode=EXCLUSIVE`) at start and holds it until `close()`; a second store on the same
file, in this process or another, fails at start with a StorageError. `serve --workers N`
needs Redis. The operating system releases the lock when a process dies, so a crashed gateway
never blocks its successor.

URI forms (see docs/redis.md, "A durable store on one machine"): everything after `sqlite://`
is a file path, taken verbatim (no percent-decoding, no `~` expansion); a leading `/` makes it
absolute (`sqlite:///var/lib/tg/counters.db`), otherwise it is relative to the working
directory when the store is built (`sqlite://counters.db`). No host, options (`?`) or
fragment (`#`); the directory must exist, the file is created.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence

from tokengateway.storage.base import CheckResult, CounterRef, StorageError
from tokengateway.storage.memory import MemoryStore
from tokengateway.storage.uri import StorageURIError

__all__ = ["FLUSH_INTERVAL", "SqliteStore", "parse_sqlite_uri"]

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 0.1  # seconds: the most a crash can lose
_SCHEMA_VERSION = 1
_Row = tuple[str, int, float]


def parse_sqlite_uri(uri: str) -> str:
    """The absolute path of the database file a `sqlite://` URI names."""
    scheme, sep, path = uri.partition("://")
    if not sep or scheme.lower() != "sqlite":
        raise StorageURIError(f"storage URI {uri!r}: not a sqlite:// URI")
    if not path:
        raise StorageURIError(
            f"storage URI {uri!r}: no database file; use sqlite:///absolute/path.db "
            "or sqlite://relative/path.db"
        )
    for ch, what in (("?", "options (?...)"), ("#", "a fragment (#...)")):
        if ch in path:
            raise StorageURIError(f"storage URI {uri!r}: {what} are not supported")
    if path == ":memory:":
        raise StorageURIError(f"storage URI {uri!r}: for counters in memory use memory://")
    if path.endswith("/"):
        raise StorageURIError(f"storage URI {uri!r}: names a directory, not a database file")
    return os.path.abspath(path)


class SqliteStore(MemoryStore):
    """The in-memory store on the wall clock, with a write-behind journal in SQLite."""

    def __init__(
        self,
        uri: str,
        *,
        clock: Callable[[], float] = time.time,
        flush_interval: float = FLUSH_INTERVAL,
    ) -> None:
        super().__init__(clock=clock)
        self.path = parse_sqlite_uri(uri)  # validated now, opened by start()
        self.uri = uri
        self.flush_interval = flush_interval
        self._db: sqlite3.Connection | None = None
        self._dirty: set[str] = set()
        self._changed = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._flushing = asyncio.Lock()
        self._start_lock = asyncio.Lock()
        self._last_flush = 0.0
        self._closed = False

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Open and lock the file, load the live counters, start the flusher."""
        async with self._start_lock:
            if self._db is not None:
                return
            self._closed = False
            db, rows = await asyncio.to_thread(self._open, self._clock())
            self._db = db
            self._load(rows)
            self._dirty.clear()
            self._changed = asyncio.Event()
            self._flusher = asyncio.create_task(self._flush_loop(), name=f"flush {self.uri}")
            log.info("storage %s: %d live counters loaded", self.uri, len(rows))

    async def close(self) -> None:
        """Stop the flusher, write every pending change, release the file."""
        async with self._start_lock:
            self._closed = True
            task, self._flusher = self._flusher, None
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if self._db is None:
                return
            try:
                await self.flush()
            finally:
                db, self._db = self._db, None
                await asyncio.to_thread(db.close)

    def _fail(self, reason: object) -> StorageError:
        return StorageError(f"storage {self.uri}: {reason}")

    def _open(self, now: float) -> tuple[sqlite3.Connection, list[_Row]]:
        """In a worker thread: connect, take the exclusive lock, create or check the schema,
        drop what has expired, read the rest."""
        directory = os.path.dirname(self.path)
        if not os.path.isdir(directory):
            raise self._fail(f"the directory {directory} does not exist")
        try:
            # timeout=0: a file locked by another store fails now rather than after 5 s
            db = sqlite3.connect(self.path, timeout=0, check_same_thread=False)
        except sqlite3.Error as exc:
            raise self._fail(f"cannot open {self.path}: {exc}") from None
        try:
            # set before WAL is entered: the lock taken by the first write is held until the
            # connection closes, and no shared-memory index lets anyone else in
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("BEGIN IMMEDIATE")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, _SCHEMA_VERSION):
                raise self._fail(
                    f"{self.path} has counter schema version {version}; this build knows "
                    f"{_SCHEMA_VERSION}"
                )
            db.execute(
                "CREATE TABLE IF NOT EXISTS counters (key TEXT PRIMARY KEY, "
                "value INTEGER NOT NULL, expires_at REAL NOT NULL) WITHOUT ROWID"
            )
            db.execute("CREATE INDEX IF NOT EXISTS counters_expiry ON counters (expires_at)")
            db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
            db.execute("DELETE FROM counters WHERE expires_at <= ?", (now,))
            rows = db.execute(
                "SELECT key, value, expires_at FROM counters WHERE expires_at > ?", (now,)
            ).fetchall()
            db.commit()
        except BaseException as exc:
            db.close()
            if isinstance(exc, StorageError):
                raise
            # by SQLite's result code, not its message text (SQLITE_BUSY: another process
            # holds the exclusive lock)
            if isinstance(exc, sqlite3.OperationalError) and _busy(exc):
                raise self._fail(
                    f"{self.path} is in use by another gateway process (one process per "
                    "database file; several processes or --workers N need Redis)"
                ) from None
            if isinstance(exc, sqlite3.Error):
                raise self._fail(f"cannot use {self.path}: {exc}") from None
            raise
        if str(mode).lower() != "wal":  # e.g. a file system without WAL support
            log.warning("storage %s: journal mode is %s, not wal", self.uri, mode)
        return db, [(k, int(v), float(e)) for k, v, e in rows]

    # --- the write-behind journal --------------------------------------------------------

    def _touched(self, keys: Iterable[str]) -> None:
        self._dirty.update(keys)
        self._changed.set()

    def _add(
        self, counters: Sequence[CounterRef], deltas: Sequence[int], now: float | None = None
    ) -> None:
        super()._add(counters, deltas, now)
        self._touched(ref.key for ref in counters)

    async def check(self, counters: Sequence[CounterRef], delta: int) -> CheckResult:
        if self._db is None and not self._closed:
            await self.start()
        return await super().check(counters, delta)

    async def update(self, counters: Sequence[CounterRef], deltas: Sequence[int]) -> None:
        if self._db is None and not self._closed:
            await self.start()
        await super().update(counters, deltas)

    async def check_and_update(self, counters: Sequence[CounterRef], delta: int) -> CheckResult:
        if self._db is None and not self._closed:
            await self.start()
        return await super().check_and_update(counters, delta)

    async def reserve(
        self,
        counters: Sequence[CounterRef],
        amounts: Sequence[int],
        ttls: Sequence[float],
        reservation: str,
    ) -> CheckResult:
        # holds live in memory only: they last seconds, and one process owns the file
        if self._db is None and not self._closed:
            await self.start()
        return await super().reserve(counters, amounts, ttls, reservation)

    async def commit(
        self, counters: Sequence[CounterRef], deltas: Sequence[int], reservation: str
    ) -> None:
        if self._db is None and not self._closed:
            await self.start()
        await super().commit(counters, deltas, reservation)

    async def retain(self, scopes: set[str]) -> int:
        dropped = self._retain(scopes)
        if dropped:
            self._touched(dropped)
        return len(dropped)

    def _batch(self) -> tuple[list[_Row], list[tuple[str]]]:
        """Take the dirty counters as rows to write and keys to delete (on the loop, so the
        batch is one consistent view of the counters)."""
        now = self._clock()
        upserts: list[_Row] = []
        deletes: list[tuple[str]] = []
        for key in self._dirty:
            entry = self._counters.get(key)
            if entry is None or entry.imag <= now:
                deletes.append((key,))
            else:
                upserts.append((key, int(entry.real), entry.imag))
        self._dirty = set()
        return upserts, deletes

    def _write(self, upserts: list[_Row], deletes: list[tuple[str]], now: float) -> None:
        """In a worker thread: one transaction for the whole batch."""
        db = self._db
        assert db is not None
        with db:
            if deletes:
                db.executemany("DELETE FROM counters WHERE key = ?", deletes)
            if upserts:
                db.executemany(
                    "INSERT INTO counters (key, value, expires_at) VALUES (?, ?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
                    "expires_at = excluded.expires_at",
                    upserts,
                )
            db.execute("DELETE FROM counters WHERE expires_at <= ?", (now,))

    async def flush(self) -> int:
        """Write the pending changes now; how many counters were written or deleted."""
        async with self._flushing:
            if self._db is None or not self._dirty:
                return 0
            upserts, deletes = self._batch()
            write = asyncio.ensure_future(
                asyncio.to_thread(self._write, upserts, deletes, self._clock())
            )
            try:
                # a cancelled flush still waits for its thread: the connection is never
                # handed to the next flush while a write is running on it
                await asyncio.shield(write)
            except BaseException:
                await asyncio.wait([write])
                if write.cancelled() or write.exception() is not None:
                    # not written: keep them for the next flush (memory holds the newer state)
                    self._dirty.update(k for k, _, _ in upserts)
                    self._dirty.update(k for (k,) in deletes)
                raise
            self._last_flush = time.monotonic()
            return len(upserts) + len(deletes)

    async def _flush_loop(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            wait = self._last_flush + self.flush_interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                await self.flush()
            except Exception as exc:  # the loop must outlive a bad disk
                log.error("storage %s: cannot write the counters (will retry): %s", self.uri, exc)
                self._changed.set()
                await asyncio.sleep(self.flush_interval)


def _busy(exc: sqlite3.Error) -> bool:
    """SQLITE_BUSY or SQLITE_LOCKED, extended codes included (their low byte)."""
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    return code is not None and (code & 0xFF) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
