"""Counters in Redis, cached by each replica (`redis+cached://` and the other `+cached` forms),
as Limitador's `redis_cached` storage.

Why: with `redis://` every check and every report is a round trip to Redis. Here the request
path never waits for Redis once a counter is known: each replica keeps, per counter, the
value it last read from Redis plus what it added since, and the end of the window as Redis
reported it. A background task sends what was added in batches every flush period, one Lua
script per Cluster slot group, and takes back each counter's global value and TTL. The
price is accuracy across replicas: a replica learns what the others added only at its
flush after theirs, so each may go on admitting for up to about two flush periods after the
limit was crossed elsewhere (docs/redis.md measures it). Within one process nothing is lost:
its own additions count at once.

The exact store (storage/redis.py) built from the same URI without `+cached` does the
talking: its connection, key layout and error translation are reused through `_eval` and
`redis_key`. Windows are still Redis TTLs: a flush adds with `SET key delta PX window NX`,
then `INCRBY`, exactly as the exact store's update does.

Reservations are delegated to the exact store: a hold only bounds concurrency if every
replica sees it at once, so `reserve` and `commit` are round trips, as with `redis://`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import parse_qsl

from tokengateway.storage.base import (
    REDIS_SCHEMES,
    CheckResult,
    CounterRef,
    CounterState,
    CounterStore,
    StorageError,
    checked,
)
from tokengateway.storage.redis import READ_COUNTERS, RedisStore
from tokengateway.storage.uri import StorageURIError, hide_password

__all__ = [
    "CACHED_SUFFIX",
    "DEFAULT_FLUSH_PERIOD",
    "DEFAULT_MAX_CACHED",
    "CachedRedisStore",
    "parse_cached_uri",
]

log = logging.getLogger("tokengateway.storage")

CACHED_SUFFIX = "+cached"
#: Limitador's default flushing period (1 s)
DEFAULT_FLUSH_PERIOD = 1.0
#: counters kept per process (Limitador keeps 10,000); one costs ~350 bytes, its key included
DEFAULT_MAX_CACHED = 100_000
#: the longest wait between two flush attempts while Redis fails (or the period, if longer):
#: short, since what is not flushed is what the other replicas do not see
MAX_BACKOFF = 2.0
#: counters per flush script: Redis runs a script alone, so a huge one would stall others
_CHUNK = 500
_SEP = "\x1f"

_OPTIONS = ("flush_period", "max_cached")

# A counter is read with the exact store's check script (value and PTTL; "0", -2 when missing).
_LOAD = READ_COUNTERS

# ARGV: delta_1, window_ms_1, ... Adds as the exact store's update does, then returns each
# counter's global value and PTTL after adding.
_FLUSH = """
local out = {}
for i, key in ipairs(KEYS) do
  local d = ARGV[2 * i - 1]
  if not redis.call('SET', key, d, 'PX', ARGV[2 * i], 'NX') then
    redis.call('INCRBY', key, d)
  end
  out[#out + 1] = redis.call('GET', key)
  out[#out + 1] = redis.call('PTTL', key)
end
return out
"""


def parse_cached_uri(uri: str) -> tuple[str, float, int]:
    """(the exact store's URI, flush period, max cached counters) of a `+cached` URI; the
    options are taken out, everything else is left to the exact store to check."""
    shown = hide_password(uri)

    def bad(reason: str) -> StorageURIError:
        return StorageURIError(f"storage URI {shown!r}: {reason}")

    scheme, sep, rest = uri.partition("://")
    scheme = scheme.lower()
    inner_scheme = scheme.removesuffix(CACHED_SUFFIX)
    if not sep or inner_scheme == scheme or inner_scheme not in REDIS_SCHEMES:
        raise bad(
            "not a cached Redis URI; supported: "
            + ", ".join(s + CACHED_SUFFIX + "://" for s in REDIS_SCHEMES)
        )
    # the credentials run to the last `@` (as the exact store reads them): the query after
    at = rest.rfind("@") + 1
    hash_at = rest.find("#", at)
    end = len(rest) if hash_at == -1 else hash_at
    query_at = rest.find("?", at, end)
    flush_period, max_cached = DEFAULT_FLUSH_PERIOD, DEFAULT_MAX_CACHED
    if query_at != -1:
        kept: list[str] = []  # the other options, as written: the exact store reads them
        query = rest[query_at + 1 : end]
        for piece in query.split("&") if query else []:
            try:
                [(name, value)] = parse_qsl(piece, keep_blank_values=True, strict_parsing=True)
            except ValueError:
                raise bad(f"cannot read the options {query!r}") from None
            if name == "flush_period":
                try:
                    flush_period = float(value)
                except ValueError:
                    flush_period = -1.0
                if not 0 < flush_period <= 3600:
                    raise bad(f"flush_period must be seconds in (0, 3600], not {value!r}")
            elif name == "max_cached":
                if not value.isdigit() or int(value) < 1:
                    raise bad(f"max_cached must be a positive integer, not {value!r}")
                max_cached = int(value)
            else:
                kept.append(piece)
        rest = rest[:query_at] + ("?" + "&".join(kept) if kept else "") + rest[end:]
    return f"{inner_scheme}://{rest}", flush_period, max_cached


class _Entry:
    """One cached counter. `value` is the global value as last read plus what this process
    added since; `pending` is what it added and has not sent yet; `ends` the window's end
    (monotonic clock; 0: no window yet); `loaded` whether `value` includes Redis's."""

    __slots__ = ("ends", "loaded", "pending", "used", "value")

    def __init__(self, value: int, ends: float, used: float, loaded: bool) -> None:
        self.value = value
        self.pending = 0
        self.ends = ends
        self.used = used
        self.loaded = loaded


class CachedRedisStore(CounterStore):
    """Counters checked and counted in this process, flushed to Redis in batches.

    Several replicas opening the same URI share their counters, each seeing the others'
    additions at its flushes; within one process every verb is atomic (nothing awaits
    between reading and adding once a counter is cached), so a limit of 5 admits 5."""

    def __init__(
        self,
        uri: str,
        flush_period: float | None = None,
        max_cached: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        inner_uri, period, most = parse_cached_uri(uri)
        try:
            self.redis = RedisStore(inner_uri)
        except StorageURIError as exc:  # named with the URI as given, our options known
            text = str(exc).replace(repr(hide_password(inner_uri)), repr(hide_password(uri)))
            if "; known: " in text:
                text += ", " + ", ".join(_OPTIONS)
            raise StorageURIError(text) from None
        self.uri = hide_password(uri)
        self.flush_period = flush_period if flush_period is not None else period
        self.max_cached = max_cached if max_cached is not None else most
        #: unflushed counters past this force a flush before the period ends
        self.max_pending = max(1, self.max_cached // 2)
        self._cluster = self.redis.config.cluster
        self._clock = clock
        self._cache: dict[str, _Entry] = {}
        #: counters with additions not sent yet: key -> its ref (the window to send)
        self._dirty: dict[str, CounterRef] = {}
        #: counters checked since the last flush (read again at the next)
        self._read: dict[str, CounterRef] = {}
        #: counters whose additions a flush is sending now (not evicted meanwhile)
        self._sending: dict[str, CounterRef] = {}
        #: loads in flight, shared by the requests that need the same counters
        self._loading: dict[str, asyncio.Future[None]] = {}
        self._flush_lock = asyncio.Lock()
        self._flushing = False
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self._closing = False
        #: figures for tests and operators
        self.flushes = 0
        self.flush_errors = 0
        self.evicted = 0
        self.dropped_expired = 0

    def __len__(self) -> int:
        return len(self._cache)

    @property
    def pending(self) -> int:
        """Counters holding additions not yet in Redis."""
        return len(self._dirty)

    def figures(self) -> dict[str, float]:
        return {
            "storage_cached_counters": len(self._cache),
            "storage_unflushed_counters": self.pending,
            "storage_flushes_total": self.flushes,
            "storage_flush_errors_total": self.flush_errors,
            "storage_cache_evictions_total": self.evicted,
        }

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        await self.redis.start()
        self._run()

    def _run(self) -> None:
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(
                self._flush_loop(), name="flush cached counters"
            )

    async def close(self) -> None:
        """Stop flushing (a flush on its way finishes: cancelled, it could not tell what
        Redis got), send what is pending (once), disconnect."""
        task, self._task = self._task, None
        if task is not None:
            self._closing = True
            assert self._wake is not None
            self._wake.set()
            await task
        if self._dirty:
            try:
                await self.flush()
            except StorageError as exc:
                log.warning(
                    "counter store %s: %d counter(s) not flushed at close: %s",
                    self.uri,
                    len(self._dirty),
                    exc,
                )
        await self.redis.close()

    async def _flush_loop(self) -> None:
        assert self._wake is not None
        delay = self.flush_period
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            self._wake.clear()
            if self._closing:
                return
            try:
                await self.flush()
            except Exception as exc:  # the loop must outlive any failure: it holds the counts
                if not isinstance(exc, StorageError):
                    log.exception("counter store %s: flush failed", self.uri)
                if not self._failing:
                    self._failing = True
                    log.warning(
                        "counter store %s: flush failing (%s); %d counter(s) kept, retrying",
                        self.uri,
                        exc,
                        len(self._dirty),
                    )
                delay = min(delay * 2, max(MAX_BACKOFF, self.flush_period))
            else:
                if self._failing:
                    self._failing = False
                    log.warning("counter store %s: flushing again", self.uri)
                delay = self.flush_period

    # --- flushing ------------------------------------------------------------------------

    async def flush(self) -> None:
        """Send every pending addition, and read again the counters checked since the last
        flush; adopt each one's global value and TTL. On a failure the additions are kept
        for the next flush and StorageError is raised."""
        async with self._flush_lock:
            if not self._dirty and not self._read:
                return
            now = self._clock()
            batch, self._dirty = self._dirty, {}
            read, self._read = self._read, {}
            items: list[tuple[CounterRef, _Entry, int]] = []
            for key, ref in batch.items():
                entry = self._cache.get(key)
                if entry is None:
                    continue
                if entry.ends and entry.ends <= now:
                    # added in a window that has ended: it counts in none
                    self.dropped_expired += 1
                    entry.pending = 0
                    continue
                items.append((ref, entry, entry.pending))
                entry.pending = 0
            # checked, not added to: what the other replicas added is read back all the same
            reads = [
                (ref, entry, 0)
                for key, ref in read.items()
                if key not in batch
                and (entry := self._cache.get(key)) is not None
                and entry.loaded
                and not (entry.ends and entry.ends <= now)
            ]
            if not items and not reads:
                return
            self._flushing = True
            self._sending = batch
            try:
                chunks = [(c, False) for c in self._chunks(items)]
                chunks += [(c, True) for c in self._chunks(reads)]
                replies = await asyncio.gather(
                    *(self._send(chunk, load) for chunk, load in chunks), return_exceptions=True
                )
            finally:
                self._flushing = False
                self._sending = {}
            now = self._clock()
            failure: BaseException | None = None
            for (chunk, load), reply in zip(chunks, replies, strict=True):
                if isinstance(reply, BaseException):
                    failure = failure or reply
                    if not load:
                        for ref, entry, delta in chunk:
                            entry.pending += delta
                            self._dirty[ref.key] = ref
                            self._cache.setdefault(ref.key, entry)
                    continue
                for n, (ref, entry, _delta) in enumerate(chunk):
                    if self._cache.get(ref.key) is not entry:
                        continue  # dropped meanwhile (retain); Redis has it
                    self._adopt(entry, ref, int(reply[2 * n]), int(reply[2 * n + 1]), now)
            self.flushes += 1
            if failure is not None:
                self.flush_errors += 1
                if isinstance(failure, StorageError):
                    raise failure
                raise StorageError(f"storage {self.uri}: {failure}") from failure

    def _chunks(
        self, items: list[tuple[CounterRef, _Entry, int]]
    ) -> list[list[tuple[CounterRef, _Entry, int]]]:
        """Items that one script may touch: one slot (namespace) each on Cluster, and at
        most `_CHUNK` counters."""
        groups: dict[str, list[tuple[CounterRef, _Entry, int]]] = {}
        if self._cluster:
            for item in items:
                groups.setdefault(item[0].key.partition(_SEP)[0], []).append(item)
        else:
            groups[""] = items
        return [g[i : i + _CHUNK] for g in groups.values() for i in range(0, len(g), _CHUNK)]

    async def _send(self, chunk: list[tuple[CounterRef, _Entry, int]], load: bool) -> Any:
        keys = [self.redis.redis_key(ref.key) for ref, _, _ in chunk]
        if load:
            return await self.redis._eval(_LOAD, keys, [])
        args: list[int] = []
        for ref, _, delta in chunk:
            args += [int(delta), max(1, round(ref.window * 1000))]
        return await self.redis._eval(_FLUSH, keys, args)

    def _adopt(self, entry: _Entry, ref: CounterRef, value: int, pttl: int, now: float) -> None:
        """Redis said `value` and `pttl`: the global value plus what was added since."""
        entry.value = value + entry.pending
        entry.loaded = True
        if pttl >= 0:
            entry.ends = now + pttl / 1000
        elif pttl == -1:  # a key without TTL, which no script writes: a full window
            entry.ends = now + ref.window
        elif not entry.pending:  # no key, nothing added locally: no window
            entry.ends = 0.0

    # --- loading -------------------------------------------------------------------------

    def _cached(self, counters: Sequence[CounterRef], now: float) -> list[_Entry] | None:
        """The entries of `counters`, when every one is cached and loaded."""
        get = self._cache.get
        read = self._read
        out = []
        for ref in counters:
            entry = get(ref.key)
            if entry is None or not entry.loaded:
                return None
            entry.used = now
            read[ref.key] = ref
            out.append(entry)
        return out

    async def _entries(self, counters: Sequence[CounterRef]) -> tuple[list[_Entry], float]:
        """Every counter's entry, loading the ones not cached (one round trip, shared by
        the requests that wait for the same counters)."""
        while True:
            now = self._clock()
            entries = self._cached(counters, now)
            if entries is not None:
                return entries, now
            waits: set[asyncio.Future[None]] = set()
            missing: list[CounterRef] = []
            for ref in counters:
                entry = self._cache.get(ref.key)
                if entry is not None and entry.loaded:
                    continue
                loading = self._loading.get(ref.key)
                if loading is not None:
                    waits.add(loading)
                elif all(m.key != ref.key for m in missing):
                    missing.append(ref)
            if missing:
                done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                for ref in missing:
                    self._loading[ref.key] = done
                try:
                    await self._load(missing)
                except BaseException as exc:
                    if isinstance(exc, StorageError):
                        done.set_exception(exc)
                        done.exception()  # retrieved: the waiters raise it themselves
                    else:
                        done.cancel()
                    raise
                else:
                    done.set_result(None)
                finally:
                    for ref in missing:
                        if self._loading.get(ref.key) is done:
                            del self._loading[ref.key]
            for wait in waits:
                try:
                    await asyncio.shield(wait)
                except asyncio.CancelledError:
                    if wait.cancelled():
                        continue  # its loader was cancelled: try again
                    raise

    async def _load(self, refs: list[CounterRef]) -> None:
        self._run()
        groups: dict[str, list[CounterRef]] = {}
        for ref in refs:
            group = ref.key.partition(_SEP)[0] if self._cluster else ""
            groups.setdefault(group, []).append(ref)
        chunks = [g[i : i + _CHUNK] for g in groups.values() for i in range(0, len(g), _CHUNK)]
        replies = await asyncio.gather(
            *(self.redis._eval(_LOAD, [self.redis.redis_key(r.key) for r in c], []) for c in chunks)
        )
        now = self._clock()
        for chunk, reply in zip(chunks, replies, strict=True):
            for n, ref in enumerate(chunk):
                value, pttl = int(reply[2 * n]), int(reply[2 * n + 1])
                entry = self._cache.get(ref.key)
                if entry is None:
                    entry = self._insert(ref.key, now)
                elif entry.ends and entry.ends <= now:
                    self._reset(entry)
                self._adopt(entry, ref, value, pttl, now)

    # --- the cache -----------------------------------------------------------------------

    def _insert(self, key: str, now: float) -> _Entry:
        if len(self._cache) >= self.max_cached:
            self._evict(now, 1)
        entry = self._cache[key] = _Entry(0, 0.0, now, False)
        return entry

    @staticmethod
    def _reset(entry: _Entry) -> None:
        """The window ended: what it counted, sent or not, counts no more."""
        entry.value = 0
        entry.pending = 0
        entry.ends = 0.0

    def _evict(self, now: float, room: int) -> None:
        """Make room: drop ended counters, then the least recently used with nothing to
        send, down to 90 % of the bound. Counters waiting to be flushed are never dropped;
        a cache full of them forces a flush, and refuses until it is done."""
        cache, dirty, loading, sending = self._cache, self._dirty, self._loading, self._sending
        for key in [k for k, e in cache.items() if e.ends and e.ends <= now]:
            del cache[key]
            if dirty.pop(key, None) is not None:
                self.dropped_expired += 1
        target = min(self.max_cached * 9 // 10, self.max_cached - room)
        if len(cache) > target:
            idle = sorted(
                (e.used, k)
                for k, e in cache.items()
                if k not in dirty and k not in loading and k not in sending
            )
            for _used, key in idle[: len(cache) - target]:
                del cache[key]
                self.evicted += 1
        if len(cache) + room > self.max_cached:
            self._flush_soon()
            raise StorageError(
                f"storage {self.uri}: {len(cache)} counters cached, all waiting to be "
                "flushed (max_cached); Redis is not taking them"
            )

    def _flush_soon(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _add(self, counters: Sequence[CounterRef], deltas: Sequence[int], now: float) -> None:
        cache, dirty = self._cache, self._dirty
        if len(cache) + len(counters) > self.max_cached:
            self._evict(now, len(counters))  # before adding anything: all or nothing
        for ref, delta in zip(counters, deltas):  # noqa: B905 - callers check the lengths
            key = ref.key
            entry = cache.get(key)
            if entry is None:
                entry = self._insert(key, now)
            elif entry.ends and entry.ends <= now:
                self._reset(entry)
            if not entry.ends:
                entry.ends = now + ref.window  # Redis opens it at the flush; adopted then
            entry.value += delta
            entry.pending += delta
            entry.used = now
            dirty[key] = ref
        if len(dirty) >= self.max_pending:
            self._flush_soon()

    # --- the verbs -----------------------------------------------------------------------

    @staticmethod
    def _states(
        counters: Sequence[CounterRef], entries: list[_Entry], delta: int, now: float
    ) -> CheckResult:
        states = tuple(
            CounterState(ref, 0, ref.window)
            if not entry.ends or entry.ends <= now
            else CounterState(ref, entry.value, entry.ends - now)
            for ref, entry in zip(counters, entries)  # noqa: B905 - same length by construction
        )
        return checked(states, delta)

    async def _looked_up(self, counters: Sequence[CounterRef]) -> tuple[list[_Entry], float]:
        """The counters' entries, from the cache when all are there, and the time read."""
        now = self._clock()
        entries = self._cached(counters, now)
        if entries is None:
            return await self._entries(counters)
        return entries, now

    async def check(self, counters: Sequence[CounterRef], delta: int) -> CheckResult:
        if not counters:
            return CheckResult(False, ())
        entries, now = await self._looked_up(counters)
        return self._states(counters, entries, delta, now)

    async def update(self, counters: Sequence[CounterRef], deltas: Sequence[int]) -> None:
        """Added here, sent at the next flush; a counter never read needs no round trip."""
        if len(counters) != len(deltas):
            raise ValueError("update: one delta per counter")
        if self._task is None and counters:
            self._run()
        self._add(counters, deltas, self._clock())

    async def check_and_update(self, counters: Sequence[CounterRef], delta: int) -> CheckResult:
        if not counters:
            return CheckResult(False, ())
        entries, now = await self._looked_up(counters)
        result = self._states(counters, entries, delta, now)
        if not result.limited:
            self._add(counters, [delta] * len(counters), now)
        return result

    async def reserve(
        self,
        counters: Sequence[CounterRef],
        amounts: Sequence[int],
        ttls: Sequence[float],
        reservation: str,
    ) -> CheckResult:
        """The exact store's reservation, after sending what this process added to these
        counters (so that Redis judges with it); the values seen are cached."""
        if not counters:
            return CheckResult(False, ())
        dirty = self._dirty
        if any(ref.key in dirty for ref in counters):
            await self.flush()
        result = await self.redis.reserve(counters, amounts, ttls, reservation)
        if not result.limited and not self._flushing:
            now = self._clock()
            for state in result.states:
                entry = self._cache.get(state.ref.key)
                if entry is None:
                    continue  # read when a check needs it
                # the window is open in Redis now (reserve opens it)
                entry.value = state.value + entry.pending
                entry.ends = now + state.expires_in
                entry.loaded = True
                entry.used = now
        return result

    async def commit(
        self, counters: Sequence[CounterRef], deltas: Sequence[int], reservation: str
    ) -> None:
        """The exact store's commit (the hold must go for every replica at once); what it
        added is added to the cached values too."""
        if not counters:
            return
        await self.redis.commit(counters, deltas, reservation)
        now = self._clock()
        for ref, delta in zip(counters, deltas, strict=True):
            entry = self._cache.get(ref.key)
            if entry is None or delta <= 0:
                continue
            if entry.ends and entry.ends <= now:
                self._reset(entry)
            if not entry.ends:
                entry.ends = now + ref.window
            entry.value += delta

    async def counters(self) -> list[tuple[str, int, float]]:
        """What Redis holds, after this process's pending additions are sent."""
        await self.flush()
        return await self.redis.counters()

    async def retain(self, scopes: set[str]) -> int:
        """The counters of removed limits go from Redis (after this process's additions
        are sent, so that the count is Redis's) and from this cache."""
        await self.flush()
        for key in [k for k in self._cache if _scope(k) not in scopes]:
            del self._cache[key]
            self._dirty.pop(key, None)
            self._read.pop(key, None)
        return await self.redis.retain(scopes)


def _scope(key: str) -> str:
    """`namespace\x1fidentifier` of a counter key (see limits.counter_scope)."""
    return _SEP.join(key.split(_SEP, 2)[:2])
