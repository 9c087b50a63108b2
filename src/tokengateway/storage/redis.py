"""Counters in Redis, shared by every gateway replica (`redis://`, `rediss://`, `redis+cluster://`,
`redis+sentinel://host:26379,.../<master name>[/db]`).

Why Lua: a limit shared by N replicas only holds if "read the counters, decide, add" happens
inside Redis, never as a read-modify-write in Python. Each verb is one script, loaded once with
SCRIPT LOAD and called with EVALSHA (reloaded on NOSCRIPT, e.g. after a restart or failover):
one round trip per verb whatever the number of counters.

Why key TTLs: windows are decided by the Redis server's clock. A window opens when a script
creates the key (`SET key delta PX window NX`) and ends when Redis expires it; `expires_in` is
the key's PTTL. No replica's clock is involved, so replicas with skewed clocks agree.

Key layout (see docs/redis.md)::

    <prefix>{<namespace>}\x1f<limit>\x1f<window ms>\x1f<values...>     the counter (a string)
    <prefix>r:{<namespace>}\x1f...                                     its holds (a hash)

`<prefix>` is `tokengateway:` unless `?prefix=` says otherwise. The counter key's first part
(the route namespace) is wrapped in a Redis Cluster hash tag, so every counter of one request
(they all share the route's namespace) lands in one slot and one script can touch them all.
In the namespace `%`, `{` and `}` are percent-escaped (an empty one is written `%`) so that
the tag is never empty nor cut short; the rest of the key is kept verbatim (\x1f included).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote

import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.crc import key_slot

from tokengateway.storage.base import (
    REDIS_SCHEMES,
    CheckResult,
    CounterRef,
    CounterState,
    CounterStore,
    StorageError,
    checked,
)
from tokengateway.storage.resp import RespConnection, RespError
from tokengateway.storage.resp import connect as resp_connect
from tokengateway.storage.uri import StorageURIError, hide_password

__all__ = ["REDIS_SCHEMES", "RedisStore", "RedisURI", "hide_password", "parse_redis_uri"]

DEFAULT_PREFIX = "tokengateway:"
_SEP = "\x1f"
_KEPT_KEYS = 100_000  # Redis keys of counter keys kept (about 200 B each)
_BATCH = 500  # keys per SCAN page / UNLINK / pipeline in the admin verbs

# Options a URI may carry after `?`, with their parsers; anything else is refused.
_FLOAT_OPTIONS = ("timeout", "connect_timeout")
_INT_OPTIONS = ("max_connections",)
_STR_OPTIONS = ("prefix",)
_SENTINEL_OPTIONS = ("sentinel_password",)
_TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")
_CERT_REQS = ("required", "optional", "none")

# --- Lua ---------------------------------------------------------------------------------
# Values travel as strings (bulk replies) so that 64-bit counters never go through Lua's
# doubles. A missing key reads as value "0", PTTL -2.

READ_COUNTERS = _CHECK = """
local out = {}
for i, key in ipairs(KEYS) do
  local v = redis.call('GET', key)
  if v then
    out[#out + 1] = v
    out[#out + 1] = redis.call('PTTL', key)
  else
    out[#out + 1] = '0'
    out[#out + 1] = -2
  end
end
return out
"""

# ARGV: delta_1, window_ms_1, delta_2, window_ms_2, ...
_UPDATE = """
for i, key in ipairs(KEYS) do
  local d = ARGV[2 * i - 1]
  if not redis.call('SET', key, d, 'PX', ARGV[2 * i], 'NX') then
    redis.call('INCRBY', key, d)
  end
end
return #KEYS
"""

# ARGV: delta, limit_1, window_ms_1, limit_2, window_ms_2, ...
# Returns {applied (0/1), value_1, pttl_1, ...}: the values seen before adding.
_CHECK_AND_UPDATE = """
local delta = tonumber(ARGV[1])
local out = {0}
local ok = true
for i, key in ipairs(KEYS) do
  local v = redis.call('GET', key)
  if v then
    out[#out + 1] = v
    out[#out + 1] = redis.call('PTTL', key)
    if tonumber(v) + delta > tonumber(ARGV[2 * i]) then ok = false end
  else
    out[#out + 1] = '0'
    out[#out + 1] = -2
    if delta > tonumber(ARGV[2 * i]) then ok = false end
  end
end
if ok then
  for i, key in ipairs(KEYS) do
    if not redis.call('SET', key, ARGV[1], 'PX', ARGV[2 * i + 1], 'NX') then
      redis.call('INCRBY', key, ARGV[1])
    end
  end
  out[1] = 1
end
return out
"""

# Holds (reservations) live in one hash per counter, `<prefix>r:{<namespace>}...`: a field per
# reservation id, valued "<amount>:<ends at, ms of Redis time>". The hash shares the counter's
# hash tag (same slot) and expires with its last hold.
# KEYS: counters then their hold hashes. ARGV: reservation id, then per counter amount,
# limit, window_ms, ttl_ms. Returns {admitted (0/1), value_1, pttl_1, held_1, ...}.
_RESERVE = """
local n = #KEYS / 2
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {0}
local ok = true
for i = 1, n do
  local key, holds = KEYS[i], KEYS[n + i]
  local v = redis.call('GET', key)
  local pttl = -2
  if v then pttl = redis.call('PTTL', key) else v = '0' end
  local held = 0
  local entries = redis.call('HGETALL', holds)
  for j = 1, #entries, 2 do
    local sep = string.find(entries[j + 1], ':', 1, true)
    local ends = tonumber(string.sub(entries[j + 1], sep + 1))
    if ends <= now then
      redis.call('HDEL', holds, entries[j])
    else
      held = held + tonumber(string.sub(entries[j + 1], 1, sep - 1))
    end
  end
  out[#out + 1] = v
  out[#out + 1] = pttl
  out[#out + 1] = held
  local need = tonumber(ARGV[4 * i - 2])
  if need < 1 then need = 1 end
  if tonumber(v) + held + need > tonumber(ARGV[4 * i - 1]) then ok = false end
end
if ok then
  for i = 1, n do
    local key, holds = KEYS[i], KEYS[n + i]
    local left = redis.call('PTTL', key)
    if left < 0 then
      redis.call('SET', key, '0', 'PX', ARGV[4 * i], 'NX')
      left = tonumber(ARGV[4 * i])
    end
    local amount = ARGV[4 * i - 2]
    if tonumber(amount) > 0 then
      local life = tonumber(ARGV[4 * i + 1])
      if left < life then life = left end
      redis.call('HSET', holds, ARGV[1], amount .. ':' .. (now + life))
      if redis.call('PTTL', holds) < life then redis.call('PEXPIRE', holds, life) end
    end
  end
  out[1] = 1
end
return out
"""

# KEYS: counters then their hold hashes. ARGV: reservation id, then delta_1, window_ms_1, ...
_COMMIT = """
local n = #KEYS / 2
for i = 1, n do
  redis.call('HDEL', KEYS[n + i], ARGV[1])
  local d = ARGV[2 * i]
  if tonumber(d) > 0 then
    if not redis.call('SET', KEYS[i], d, 'PX', ARGV[2 * i + 1], 'NX') then
      redis.call('INCRBY', KEYS[i], d)
    end
  end
end
return n
"""


@dataclass(frozen=True, slots=True)
class RedisURI:
    """A parsed storage URI; `shown` is the URI with the password hidden, for messages."""

    uri: str = field(repr=False)  # carries the password
    shown: str
    cluster: bool
    tls: bool
    nodes: tuple[tuple[str, int], ...]
    db: int = 0
    #: the master's name when `nodes` are Sentinels (`redis+sentinel://`)
    service: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    prefix: str = DEFAULT_PREFIX
    timeout: float = 5.0
    connect_timeout: float = 2.0
    max_connections: int = 64
    tls_options: dict[str, str] = field(default_factory=dict)


def _split_netloc(rest: str) -> tuple[str, str, str, str]:
    """(netloc, path, query, fragment) of what follows `scheme://`; the credentials end at
    the last `@` (as in `hide_password`), so a password needs no escaping."""
    at = rest.rfind("@") + 1
    cut = len(rest)
    for ch in "/?#":
        i = rest.find(ch, at)
        if i != -1:
            cut = min(cut, i)
    netloc, after = rest[:cut], rest[cut:]
    after, _hash, fragment = after.partition("#")
    path, _q, query = after.partition("?")
    return netloc, path, query, fragment


def parse_redis_uri(uri: str) -> RedisURI:
    """Validate a Redis URI fully before anything connects (so `serve` fails fast)."""
    shown = hide_password(uri)

    def bad(reason: str) -> StorageURIError:
        return StorageURIError(f"storage URI {shown!r}: {reason}")

    scheme, sep, rest = uri.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in REDIS_SCHEMES:
        raise bad(f"not a Redis URI; supported: {', '.join(s + '://' for s in REDIS_SCHEMES)}")
    cluster = scheme.endswith("+cluster")
    sentinel = scheme.endswith("+sentinel")
    tls = scheme.startswith("rediss")
    netloc, path, query_text, fragment = _split_netloc(rest)
    if fragment:
        raise bad("a fragment (#...) means nothing here")

    userinfo, at, hostlist = netloc.rpartition("@")
    username: str | None = None
    password: str | None = None
    if at:
        user, colon, pw = userinfo.partition(":")
        if colon:
            username, password = unquote(user) or None, unquote(pw) or None
        else:
            password = unquote(user) or None
    default_port = 26379 if sentinel else 6379  # where Sentinels and servers listen
    nodes = tuple(_parse_host(h, bad, default_port) for h in hostlist.split(","))
    if not cluster and not sentinel and len(nodes) > 1:
        raise bad(f"several hosts need {scheme}+cluster:// (or +sentinel://)")

    path = path.strip("/")
    db = 0
    service: str | None = None
    if sentinel:
        service, _slash, path = path.partition("/")
        if not service:
            raise bad("name the master after the Sentinels: redis+sentinel://HOST:26379/MASTER")
    if path:
        if not path.isdigit():
            raise bad(f"the database must be a number, not {path!r}")
        db = int(path)
        if cluster and db != 0:
            raise bad("Redis Cluster has only database 0")

    options: dict[str, Any] = {}
    tls_options: dict[str, str] = {}
    known = (
        _FLOAT_OPTIONS
        + _INT_OPTIONS
        + _STR_OPTIONS
        + (_TLS_OPTIONS if tls else ())
        + (_SENTINEL_OPTIONS if sentinel else ())
    )
    try:
        query = parse_qsl(query_text, keep_blank_values=True, strict_parsing=bool(query_text))
    except ValueError:
        raise bad(f"cannot read the options {query_text!r}") from None
    for name, value in query:
        if name not in known:
            raise bad(f"unknown option {name!r}; known: {', '.join(known)}")
        if name in _FLOAT_OPTIONS:
            try:
                number = float(value)
            except ValueError:
                number = -1.0
            if not number > 0:
                raise bad(f"{name} must be a positive number of seconds, not {value!r}")
            options[name] = number
        elif name in _INT_OPTIONS:
            if not value.isdigit() or int(value) < 1:
                raise bad(f"{name} must be a positive integer, not {value!r}")
            options[name] = int(value)
        elif name == "prefix":
            if not value or any(c in value for c in "{}"):
                raise bad(
                    "prefix must be non-empty and without braces (they would make it "
                    "the Cluster hash tag)"
                )
            options[name] = value
        elif name == "sentinel_password":
            options[name] = value
        else:
            if name == "ssl_cert_reqs" and value not in _CERT_REQS:
                raise bad(f"ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}")
            tls_options[name] = value
    return RedisURI(
        uri=uri,
        shown=shown,
        cluster=cluster,
        tls=tls,
        nodes=nodes,
        db=db,
        service=service,
        username=username,
        password=password,
        tls_options=tls_options,
        **options,
    )


def _parse_host(
    text: str, bad: Callable[[str], StorageURIError], default_port: int = 6379
) -> tuple[str, int]:
    if not text:
        raise bad("a host is missing")
    if text.startswith("["):
        host, close, port_text = text[1:].partition("]")
        if not close or (port_text and not port_text.startswith(":")):
            raise bad(f"bad host {text!r}")
        port_text = port_text[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad(f"bad IPv6 address {host!r}") from None
    else:
        host, _colon, port_text = text.partition(":")
        if not host or any(c in host for c in "[]"):
            raise bad(f"bad host {text!r}")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise bad(f"bad port {port_text!r}")
    return host, int(port_text)


# --- keys ----------------------------------------------------------------------------------


def _escape_tag(namespace: str) -> str:
    if not namespace:
        return "%"  # never produced by escaping, which always writes %XX
    return namespace.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


def _unescape_tag(tag: str) -> str:
    return "" if tag == "%" else unquote(tag)


def _namespace(key: str) -> str:
    return key.partition(_SEP)[0]


def _scope(key: str) -> str:
    """`namespace\x1fidentifier` of a counter key (see limits.counter_scope)."""
    return _SEP.join(key.split(_SEP, 2)[:2])


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _window_ms(ref: CounterRef) -> int:
    return max(1, round(ref.window * 1000))


_T = TypeVar("_T")

# What a Redis call can raise when the server is away or refuses (RedisClusterException,
# "cannot be connected" or a slot not covered, is not a RedisError).
_FAILURES = (rexc.RedisError, rexc.RedisClusterException, OSError)


class RedisStore(CounterStore):
    """Fixed-window counters in Redis or Redis Cluster; every verb is one atomic script.

    Several gateway processes opening the same URI share their counters exactly: a limit
    of 5 lets 5 requests through across all replicas, not 5 per replica.
    """

    def __init__(self, uri: str) -> None:
        self.config = parse_redis_uri(uri)
        self.uri = self.config.shown
        self._prefix = self.config.prefix.encode()
        self._client: aioredis.Redis | RedisCluster | None = None
        self._sentinel: Sentinel | None = None
        self._shas: dict[str, str] = {}
        self._start_lock = asyncio.Lock()
        # The counting verbs go over our own pipelined connections (storage/resp.py), one
        # per Redis node; redis-py keeps discovery and the admin verbs.
        self._conns: dict[tuple[str, int], RespConnection] = {}
        self._connecting: dict[tuple[str, int], asyncio.Future[RespConnection]] = {}
        self._master: tuple[str, int] | None = None  # the one node (standalone, Sentinel)
        self._slot_nodes: list[tuple[str, int] | None] = []  # Cluster: slot -> primary
        self._ssl: ssl.SSLContext | None = None
        self._keys: dict[str, bytes] = {}  # counter key -> Redis key (see redis_key)
        # redis-py's asyncio pools raise "Too many connections" instead of waiting (and the
        # Cluster client has no blocking pool): callers past the bound queue here instead.
        self._slots = asyncio.Semaphore(self.config.max_connections)

    # --- lifecycle -----------------------------------------------------------------------

    @property
    def cluster(self) -> bool:
        return self.config.cluster

    @property
    def client(self) -> aioredis.Redis | RedisCluster:
        """The connected client (for tests and the admin API); `start()` first."""
        if self._client is None:
            raise StorageError(f"storage {self.uri}: not started")
        return self._client

    def _make_client(self) -> aioredis.Redis | RedisCluster:
        c = self.config
        common: dict[str, Any] = {
            "username": c.username,
            "password": c.password,
            "socket_timeout": c.timeout,
            "socket_connect_timeout": c.connect_timeout,
            # headroom over the semaphore for SCAN pages, which run outside it
            "max_connections": c.max_connections + 2,
            "decode_responses": False,
            # a stale pooled connection after a Redis restart is retried, briefly
            "retry": Retry(ExponentialBackoff(cap=0.2, base=0.01), 2),
        }
        if c.tls:
            common["ssl"] = True
            common.update(c.tls_options)
        if c.cluster:
            nodes = [ClusterNode(host, port) for host, port in c.nodes]
            return RedisCluster(startup_nodes=nodes, **common)
        if c.service is not None:
            # the Sentinels name the master; a failover is followed on the next connection
            sentinel_kwargs = {
                "password": c.sentinel_password,
                "socket_timeout": c.timeout,
                "socket_connect_timeout": c.connect_timeout,
            }
            if c.tls:
                sentinel_kwargs.update(ssl=True, **c.tls_options)
            sentinels = Sentinel(list(c.nodes), sentinel_kwargs=sentinel_kwargs, **common)
            self._sentinel = sentinels
            return sentinels.master_for(c.service, db=c.db)
        host, port = c.nodes[0]
        # redis-py picks the hiredis parser by itself when `hiredis` is installed
        return aioredis.Redis(host=host, port=port, db=c.db, **common)

    async def start(self) -> None:
        """Connect, PING and load the scripts: a bad address or password fails here, named."""
        async with self._start_lock:
            if self._client is not None:
                return
            client = self._make_client()
            try:
                if isinstance(client, RedisCluster):
                    await client.initialize()
                await client.ping()
                shas = {}
                for source in (_CHECK, _UPDATE, _CHECK_AND_UPDATE, _RESERVE, _COMMIT):
                    shas[source] = await client.script_load(source)
                await self._locate(client)
            except _FAILURES as exc:
                await _close_quietly(client)
                raise StorageError(
                    f"storage {self.uri}: cannot use Redis: {self._reason(exc)}"
                ) from None
            self._shas = shas
            self._client = client

    async def _locate(self, client: aioredis.Redis | RedisCluster) -> None:
        """Where the counting verbs go: the server, the Sentinels' master, or per Cluster
        slot its primary (from redis-py's slot map, read at start and on MOVED)."""
        c = self.config
        if c.tls and self._ssl is None:
            self._ssl = _ssl_context(c.tls_options)
        if isinstance(client, RedisCluster):
            slots: list[tuple[str, int] | None] = [None] * 16384
            for slot, nodes in client.nodes_manager.slots_cache.items():
                if nodes:
                    slots[slot] = (nodes[0].host, int(nodes[0].port))
            self._slot_nodes = slots
        elif self._sentinel is not None:
            assert c.service is not None
            host, port = await self._sentinel.discover_master(c.service)
            self._master = (str(host), int(port))
        else:
            self._master = c.nodes[0]

    async def close(self) -> None:
        client, self._client = self._client, None
        conns, self._conns = self._conns, {}
        for conn in conns.values():
            conn.close()
        if client is not None:
            await _close_quietly(client)

    def _reason(self, exc: BaseException) -> str:
        """The error's text, never carrying the password."""
        text = str(exc) or type(exc).__name__
        if isinstance(exc, rexc.AuthenticationError) or "WRONGPASS" in text:
            text = f"authentication failed ({text})"
        for secret in (self.config.password, self.config.sentinel_password):
            if secret:
                text = text.replace(secret, "***")
        return text

    # --- scripts -------------------------------------------------------------------------

    async def _eval(self, source: str, keys: Sequence[bytes], args: Sequence[int | str]) -> Any:
        """EVALSHA on the node that holds `keys` (all in one Cluster slot), over a pipelined
        connection. Reloads the script when the server lost it (restart, failover), follows
        MOVED/ASK, and finds a new master on READONLY; none of these ran the script, so it is
        sent again. A command whose connection broke after it was written is not: it may
        have run, and counting it twice would be worse than one 503 (or one kept report).
        Any Lua source may be given: one this store does not know is loaded on first use."""
        if self._client is None:
            await self.start()
        sha = self._shas.get(source)
        command: list[Any] = ["EVALSHA", sha, len(keys), *keys, *args]
        slot = key_slot(keys[0]) if self.config.cluster and keys else -1
        address = self._node(slot)
        ask = False
        try:
            for _attempt in range(5):
                conn = self._conns.get(address) if address is not None else None
                if conn is None or not conn.usable:
                    if self._sentinel is not None:  # a new connection asks where the master is
                        await self._locate(self.client)
                        address = self._master
                    conn = await self._connect(address)
                if sha is None:
                    sha = self._shas[source] = await self._load(conn, source)
                    command[1] = sha
                if ask:
                    _asking, fut = conn.call_many((("ASKING",), command))
                    ask = False
                else:
                    fut = conn.call(command)
                reply = await fut
                if not isinstance(reply, RespError):
                    return reply
                text = str(reply)
                kind = text.partition(" ")[0]
                if kind == "NOSCRIPT":
                    sha = None
                elif kind in ("MOVED", "ASK"):
                    # "MOVED <slot> <host>:<port>": the slot lives elsewhere now
                    host, _colon, port = text.split(" ")[2].rpartition(":")
                    address = (host.strip("[]") or conn.address[0], int(port))
                    if kind == "MOVED":
                        self._slot_nodes[slot] = address
                    ask = kind == "ASK"
                elif kind == "READONLY" and self._sentinel is not None:
                    conn.close()  # a replica now: the Sentinels know the new master
                    await self._locate(self.client)
                    address = self._master
                else:
                    raise rexc.ResponseError(text)
            raise rexc.ResponseError(f"gave up after 5 redirections for slot {slot}")
        except (*_FAILURES, ConnectionError, TimeoutError) as exc:
            raise StorageError(f"storage {self.uri}: {self._reason(exc)}") from exc

    def _node(self, slot: int) -> tuple[str, int] | None:
        if slot < 0:
            return self._master
        return self._slot_nodes[slot] if self._slot_nodes else None

    async def _connect(self, address: tuple[str, int] | None) -> RespConnection:
        """The connection to `address`, made once however many requests wait for it."""
        if address is None:  # a Cluster slot no primary serves (yet): ask the cluster again
            raise rexc.RedisClusterException("a slot is not served by any node")
        pending = self._connecting.get(address)
        if pending is None:
            pending = asyncio.ensure_future(self._open(address))
            self._connecting[address] = pending
            pending.add_done_callback(lambda _: self._connecting.pop(address, None))
        return await asyncio.shield(pending)

    async def _open(self, address: tuple[str, int]) -> RespConnection:
        c = self.config
        try:
            conn = await resp_connect(
                address,
                timeout=c.timeout,
                connect_timeout=c.connect_timeout,
                username=c.username,
                password=c.password,
                db=c.db,
                ssl_context=self._ssl,
            )
        except (OSError, TimeoutError) as exc:
            # the master may have moved (Sentinel), or the slot's primary failed over
            # (Cluster): where the next command goes is asked again
            with contextlib.suppress(*_FAILURES):
                client = self.client
                if isinstance(client, RedisCluster):
                    await client.nodes_manager.initialize()
                await self._locate(client)
            raise ConnectionError(f"cannot connect to {address[0]}:{address[1]}: {exc}") from None
        old = self._conns.get(address)
        if old is not None:
            old.close()
        self._conns[address] = conn
        return conn

    async def _load(self, conn: RespConnection, source: str) -> str:
        reply = await conn.call(("SCRIPT", "LOAD", source))
        if isinstance(reply, RespError):
            raise rexc.ResponseError(str(reply))
        return reply.decode() if isinstance(reply, bytes) else str(reply)

    def _groups(self, counters: Sequence[CounterRef]) -> list[list[int]]:
        """Indices of `counters` that one script may touch together.

        One Redis node holds every key, so a single group; on Cluster, one group per
        namespace (hash tag), which is a single group for any one request's counters."""
        if not self.cluster:
            return [list(range(len(counters)))]
        groups: dict[str, list[int]] = {}
        for i, ref in enumerate(counters):
            groups.setdefault(_namespace(ref.key), []).append(i)
        return list(groups.values())

    async def _per_group(
        self, counters: Sequence[CounterRef], run: Callable[[list[int]], Awaitable[_T]]
    ) -> list[tuple[list[int], _T]]:
        if not self.config.cluster:  # one node holds every key
            every = list(range(len(counters)))
            return [(every, await run(every))]
        groups = self._groups(counters)
        if len(groups) == 1:
            return [(groups[0], await run(groups[0]))]
        results = await asyncio.gather(*(run(g) for g in groups))
        return list(zip(groups, results, strict=True))

    # --- the verbs -----------------------------------------------------------------------

    async def check(self, counters: Sequence[CounterRef], delta: int) -> CheckResult:
        if not counters:
            return CheckResult(False, ())

        async def run(idx: list[int]) -> Any:
            return await self._eval(_CHECK, [self.redis_key(counters[i].key) for i in idx], [])

        raw: list[Any] = [None] * (2 * len(counters))
        for idx, reply in await self._per_group(counters, run):
            for j, i in enumerate(idx):
                raw[2 * i], raw[2 * i + 1] = reply[2 * j], reply[2 * j + 1]
        return _result(counters, delta, raw)

    async def update(self, counters: Sequence[CounterRef], deltas: Sequence[int]) -> None:
        if len(counters) != len(deltas):
            raise ValueError("update: one delta per counter")
        if not counters:
            return

        async def run(idx: list[int]) -> Any:
            args: list[int] = []
            for i in idx:
                args += [int(deltas[i]), _window_ms(counters[i])]
            return await self._eval(_UPDATE, [self.redis_key(counters[i].key) for i in idx], args)

        await self._per_group(counters, run)

    async def check_and_update(self, counters: Sequence[CounterRef], delta: int) -> CheckResult:
        if not counters:
            return CheckResult(False, ())
        self._one_slot(counters, "check_and_update")
        args: list[int] = [int(delta)]
        for ref in counters:
            args += [int(ref.limit), _window_ms(ref)]
        reply = await self._eval(_CHECK_AND_UPDATE, [self.redis_key(r.key) for r in counters], args)
        return _result(counters, delta, reply[1:])

    async def reserve(
        self,
        counters: Sequence[CounterRef],
        amounts: Sequence[int],
        ttls: Sequence[float],
        reservation: str,
    ) -> CheckResult:
        if not counters:
            return CheckResult(False, ())
        self._one_slot(counters, "reserve")
        keys = [self.redis_key(r.key) for r in counters]
        args: list[int | str] = [reservation]
        for ref, amount, ttl in zip(counters, amounts, ttls, strict=True):
            args += [int(amount), int(ref.limit), _window_ms(ref), max(1, round(ttl * 1000))]
        reply = await self._eval(_RESERVE, keys + [self.holds_key(k) for k in keys], args)
        states: list[CounterState] = []
        limiting: int | None = None
        for i, ref in enumerate(counters):
            value, pttl, held = (int(x) for x in reply[1 + 3 * i : 4 + 3 * i])
            state = CounterState(ref, value, pttl / 1000 if pttl >= 0 else ref.window, held)
            states.append(state)
            if value + held + max(amounts[i], 1) > ref.limit and (
                limiting is None or state.expires_in > states[limiting].expires_in
            ):
                limiting = i
        return CheckResult(limiting is not None, tuple(states), limiting)

    async def commit(
        self, counters: Sequence[CounterRef], deltas: Sequence[int], reservation: str
    ) -> None:
        if not counters:
            return
        self._one_slot(counters, "commit")
        keys = [self.redis_key(r.key) for r in counters]
        args: list[int | str] = [reservation]
        for ref, delta in zip(counters, deltas, strict=True):
            args += [int(delta), _window_ms(ref)]
        await self._eval(_COMMIT, keys + [self.holds_key(k) for k in keys], args)

    def _one_slot(self, counters: Sequence[CounterRef], verb: str) -> None:
        if len(self._groups(counters)) > 1:
            names = sorted({_namespace(r.key) for r in counters})
            raise StorageError(
                f"storage {self.uri}: {verb} is atomic only within one namespace on "
                f"Redis Cluster; got {names}"
            )

    # --- inspection and clean-up ---------------------------------------------------------

    async def _scan(self) -> Any:
        pattern = _glob_escape(self.config.prefix) + "{*"
        if self._client is None:
            await self.start()
        # on Cluster, redis-py's scan_iter walks every primary in turn
        return self.client.scan_iter(match=pattern, count=_BATCH)

    async def _pages(self) -> Any:
        page: list[bytes] = []
        try:
            async for key in await self._scan():
                page.append(key)
                if len(page) >= _BATCH:
                    yield page
                    page = []
        except _FAILURES as exc:
            raise StorageError(f"storage {self.uri}: {self._reason(exc)}") from exc
        if page:
            yield page

    async def counters(self) -> list[tuple[str, int, float]]:
        out: list[tuple[str, int, float]] = []
        async for page in self._pages():
            try:
                pipe = self.client.pipeline()
                for key in page:
                    pipe.get(key)
                    pipe.pttl(key)
                async with self._slots:
                    replies = await pipe.execute()
            except _FAILURES as exc:
                raise StorageError(f"storage {self.uri}: {self._reason(exc)}") from exc
            for n, raw_key in enumerate(page):
                value, pttl = replies[2 * n], replies[2 * n + 1]
                key = self.counter_key(raw_key)
                if value is None or key is None or pttl == -2:
                    continue  # expired since the scan, or not ours
                out.append((key, int(value), max(pttl, 0) / 1000))
        return out

    async def retain(self, scopes: set[str]) -> int:
        dropped = 0
        doomed: list[bytes] = []
        async for page in self._pages():
            for raw_key in page:
                key = self.counter_key(raw_key)
                if key is not None and _scope(key) not in scopes:
                    doomed.append(raw_key)
            while len(doomed) >= _BATCH:
                dropped += await self._unlink(doomed[:_BATCH])
                del doomed[:_BATCH]
        if doomed:
            dropped += await self._unlink(doomed)
        return dropped

    async def _unlink(self, keys: list[bytes]) -> int:
        try:
            # redis-py's cluster client splits a multi-key UNLINK by slot
            async with self._slots:
                return int(await self.client.unlink(*keys))
        except _FAILURES as exc:
            raise StorageError(f"storage {self.uri}: {self._reason(exc)}") from exc

    # --- key mapping ---------------------------------------------------------------------

    def redis_key(self, key: str) -> bytes:
        """The Redis key of a counter key: prefix, `{namespace}` hash tag, the rest as is
        (kept: a user's counters are the same keys request after request)."""
        found = self._keys.get(key)
        if found is None:
            namespace, sep, rest = key.partition(_SEP)
            found = self._prefix + f"{{{_escape_tag(namespace)}}}{sep}{rest}".encode()
            if len(self._keys) >= _KEPT_KEYS:
                self._keys.clear()  # bounded; refilled by the keys in use
            self._keys[key] = found
        return found

    def holds_key(self, redis_key: bytes) -> bytes:
        """The hash of a counter's holds: `<prefix>r:` then the counter key's tagged part
        (outside the counters' SCAN pattern, inside their Cluster slot)."""
        return self._prefix + b"r:" + redis_key[len(self._prefix) :]

    def counter_key(self, redis_key: bytes) -> str | None:
        """The inverse of `redis_key`; None for a key this store did not write."""
        if not redis_key.startswith(self._prefix):
            return None
        try:
            text = redis_key[len(self._prefix) :].decode()
        except UnicodeDecodeError:
            return None
        if not text.startswith("{"):
            return None
        tag, close, rest = text[1:].partition("}")
        if not close or (rest and not rest.startswith(_SEP)):
            return None
        return _unescape_tag(tag) + rest


def _result(counters: Sequence[CounterRef], delta: int, raw: Sequence[Any]) -> CheckResult:
    """A CheckResult from (value, pttl) pairs, with MemoryStore's choice of limiting counter.
    PTTL -2 (no key: the window has not started) or -1 (a key without TTL, which no script
    writes) reads as a whole window."""
    states = []
    for i, ref in enumerate(counters):
        pttl = int(raw[2 * i + 1])
        states.append(CounterState(ref, int(raw[2 * i]), pttl / 1000 if pttl >= 0 else ref.window))
    return checked(tuple(states), delta)


def _ssl_context(options: dict[str, str]) -> ssl.SSLContext:
    """The client TLS context `rediss://` options describe, as redis-py builds it: verified
    against `ssl_ca_certs` (else the system's CAs) with the host name checked, unless
    `ssl_cert_reqs` says optional or none."""
    ctx = ssl.create_default_context(cafile=options.get("ssl_ca_certs"))
    reqs = options.get("ssl_cert_reqs", "required")
    if reqs != "required":
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_OPTIONAL if reqs == "optional" else ssl.CERT_NONE
    if "ssl_certfile" in options:
        ctx.load_cert_chain(options["ssl_certfile"], options.get("ssl_keyfile"))
    return ctx


async def _close_quietly(client: aioredis.Redis | RedisCluster) -> None:
    try:
        if isinstance(client, RedisCluster):
            await client.aclose()
        else:
            await client.aclose(close_connection_pool=True)
    except (*_FAILURES, RuntimeError):
        pass
