"""Prometheus metrics of the data path, in the text exposition format.

Limitador's names come first, so that Kuadrant's dashboards work unchanged:
`authorized_calls`, `authorized_hits` (tokens, for token limits) and `limited_calls`, each
labelled `limitador_namespace` (the route, which is the counters' namespace) and `limit_name`
(`policy-namespace/policy/limit`). Ours are prefixed `tokengateway_`. Every label comes from
the configuration or a small fixed set (status codes, token kinds): no user id, so the number
of series stays bounded.

Recording is a few dict increments and a bisect per histogram: no locks (one event loop).

With `serve --workers N` every process records its own. `Metrics.snapshot` turns one
process's tables, plus its single-value figures (`FIGURES`: estimated usage, the store's
errors and kept reports), into plain data the leader can receive over its channel to a
follower; `merge` sums snapshots (counters and histogram buckets per label set, figures by
name) and `render_snapshot` writes the result in the text format.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "FIGURES",
    "Histogram",
    "Metrics",
    "Snapshot",
    "merge",
    "process_snapshot",
    "render_snapshot",
]

#: plain data (dicts, lists, tuples, strings, numbers) a worker can pickle: see `Metrics.snapshot`
Snapshot = dict[str, Any]

#: the single-value series beside the tables, rendered `tokengateway_NAME`: (type, help).
#: Summed over the workers like the counters, gauges included: `storage_reports_pending` of
#: all the workers is the number of reports kept by all of them.
FIGURES: dict[str, tuple[str, str]] = {
    "usage_estimated_total": (
        "counter",
        "Responses charged by an estimate because the upstream reported no usage.",
    ),
    "storage_errors_total": ("counter", "Counter store calls that failed."),
    "storage_reports_pending": (
        "gauge",
        "Token reports kept while the counter store is failing, waiting to be replayed "
        "(all workers).",
    ),
    "storage_reports_replayed_total": (
        "counter",
        "Kept token reports applied once the counter store answered again.",
    ),
    "storage_reports_dropped_total": (
        "counter",
        "Kept token reports lost because the bound was reached.",
    ),
    # a cached Redis store's (redis+cached://, docs/redis.md)
    "storage_cached_counters": ("gauge", "Counters kept in the process (all workers)."),
    "storage_unflushed_counters": (
        "gauge",
        "Cached counters holding counts not yet flushed to Redis (all workers).",
    ),
    "storage_flushes_total": ("counter", "Flushes of cached counts to Redis."),
    "storage_flush_errors_total": (
        "counter",
        "Flushes that failed (their counts kept and sent again).",
    ),
    "storage_cache_evictions_total": (
        "counter",
        "Cached counters dropped to stay within max_cached.",
    ),
    "limited_kept_total": (
        "counter",
        "Refusals by a spent counter answered again without asking the counter store.",
    ),
    "workers": (
        "gauge",
        "Gateway processes serving the listen socket (serve --workers; 1 without).",
    ),
    "workers_unreported": (
        "gauge",
        "Serving processes whose figures are missing from this scrape (no answer within 1s).",
    ),
    # a follower's (serve --kubeconfig): how current its configuration is
    "config_age_seconds": (
        "gauge",
        "Seconds since the configuration was last known to match the Kubernetes API "
        "(0 while every watch is connected; -1 before the first list).",
    ),
    "watch_errors_total": ("counter", "Lists and watches of the Kubernetes API that failed."),
    "watch_relists_total": ("counter", "Watches that expired (410 Gone) and listed again."),
    "config_builds_total": ("counter", "Configurations built from the Kubernetes API."),
    "config_build_errors_total": (
        "counter",
        "Sets of objects from the Kubernetes API that did not build (the last one is served).",
    ),
    "objects_skipped": ("gauge", "Objects from the Kubernetes API skipped as invalid."),
    "status_writes_total": ("counter", "Status subresources written by this replica."),
    "status_writer": ("gauge", "1 while this replica holds the Lease that elects the writer."),
}

#: seconds; upstream latency and time to first token of LLMs span milliseconds to minutes
LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)
#: seconds; what the gateway itself adds is meant to be well under a millisecond
OVERHEAD_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
)


class Histogram:
    """Cumulative-bucket histogram for one label set."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def lines(self, name: str, labels: str) -> Iterable[str]:
        sep = "," if labels else ""
        running = 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            running += count
            yield f'{name}_bucket{{{labels}{sep}le="{bound:g}"}} {running}'
        running += self.counts[-1]
        yield f'{name}_bucket{{{labels}{sep}le="+Inf"}} {running}'
        yield f"{name}_sum{{{labels}}} {self.sum:.6f}" if labels else f"{name}_sum {self.sum:.6f}"
        yield f"{name}_count{{{labels}}} {running}" if labels else f"{name}_count {running}"

    def snapshot(self) -> Snapshot:
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum": self.sum}

    @classmethod
    def from_snapshot(cls, data: Mapping[str, Any]) -> Histogram:
        hist = cls(data["bounds"])
        if len(data["counts"]) != len(hist.counts):
            raise ValueError("a histogram snapshot needs one count per bound, and +Inf")
        hist.counts = [int(c) for c in data["counts"]]
        hist.sum = float(data["sum"])
        return hist


_Key = tuple[str, ...]

#: the counter tables of `Metrics` (label tuple -> count), by attribute name
_COUNTERS = ("authorized_calls", "authorized_hits", "limited_calls", "requests", "tokens")
#: its histogram tables (route -> Histogram)
_HISTOGRAMS = ("upstream", "first_token")


class Metrics:
    def __init__(self) -> None:
        # Limitador's: (limitador_namespace, limit_name) -> count
        self.authorized_calls: dict[_Key, int] = {}
        self.authorized_hits: dict[_Key, int] = {}
        self.limited_calls: dict[_Key, int] = {}
        # ours
        self.requests: dict[_Key, int] = {}  # (route, status code)
        self.tokens: dict[_Key, int] = {}  # (route, kind: prompt | completion)
        self.upstream: dict[str, Histogram] = {}  # route -> seconds to the whole answer
        self.first_token: dict[str, Histogram] = {}  # route -> seconds to the first chunk
        self.overhead = Histogram(OVERHEAD_BUCKETS)

    # --- recording (the data path) -------------------------------------------------------

    def authorized(self, namespace: str, limits: Iterable[str]) -> None:
        calls = self.authorized_calls
        for name in limits:
            key = (namespace, name)
            calls[key] = calls.get(key, 0) + 1

    def hits(self, namespace: str, limits: Sequence[str], deltas: Sequence[int]) -> None:
        hits = self.authorized_hits
        for name, delta in zip(limits, deltas, strict=True):
            key = (namespace, name)
            hits[key] = hits.get(key, 0) + delta

    def limited(self, namespace: str, limit: str) -> None:
        key = (namespace, limit)
        self.limited_calls[key] = self.limited_calls.get(key, 0) + 1

    def request(
        self,
        route: str,
        status: int,
        prompt_tokens: int,
        completion_tokens: int,
        upstream: float | None,
        first_token: float | None,
        overhead: float | None,
    ) -> None:
        key = (route, str(status))
        self.requests[key] = self.requests.get(key, 0) + 1
        if prompt_tokens or completion_tokens:
            for kind, n in (("prompt", prompt_tokens), ("completion", completion_tokens)):
                tkey = (route, kind)
                self.tokens[tkey] = self.tokens.get(tkey, 0) + n
        if upstream is not None:
            hist = self.upstream.get(route)
            if hist is None:
                hist = self.upstream[route] = Histogram(LATENCY_BUCKETS)
            hist.observe(upstream)
        if first_token is not None:
            hist = self.first_token.get(route)
            if hist is None:
                hist = self.first_token[route] = Histogram(LATENCY_BUCKETS)
            hist.observe(first_token)
        if overhead is not None:
            self.overhead.observe(overhead)

    def retain(self, routes: set[str]) -> None:
        """Forget the series of routes no longer configured (bounded across reloads)."""
        for table in (
            self.authorized_calls,
            self.authorized_hits,
            self.limited_calls,
            self.requests,
            self.tokens,
        ):
            for key in [k for k in table if k[0] not in routes and k[0] != ""]:
                del table[key]
        for hists in (self.upstream, self.first_token):
            for route in [r for r in hists if r not in routes]:
                del hists[route]

    # --- snapshots (serve --workers) ------------------------------------------------------

    def snapshot(self, figures: Mapping[str, float] | None = None) -> Snapshot:
        """These tables as plain data, copied (the recording goes on in the copy's stead),
        with `figures` (name -> value, see `FIGURES`) beside them. Take it on the event loop
        that records; the copy may then be pickled from any thread."""
        snap: Snapshot = {name: dict(getattr(self, name)) for name in _COUNTERS}
        for name in _HISTOGRAMS:
            snap[name] = {route: h.snapshot() for route, h in getattr(self, name).items()}
        snap["overhead"] = self.overhead.snapshot()
        snap["figures"] = dict(figures or {})
        return snap

    @classmethod
    def from_snapshot(cls, snap: Mapping[str, Any]) -> Metrics:
        """The tables of a snapshot (its figures are not part of a Metrics)."""
        metrics = cls()
        for name in _COUNTERS:
            setattr(metrics, name, {tuple(k): v for k, v in snap.get(name, {}).items()})
        for name in _HISTOGRAMS:
            hists = {r: Histogram.from_snapshot(h) for r, h in snap.get(name, {}).items()}
            setattr(metrics, name, hists)
        if "overhead" in snap:
            metrics.overhead = Histogram.from_snapshot(snap["overhead"])
        return metrics

    # --- exposition ----------------------------------------------------------------------

    def render(self, gauges: Iterable[tuple[str, str, str, float]] = ()) -> str:
        """The text format; `gauges` adds (name, type, help, value) single-value series."""
        out: list[str] = []
        limitador = (
            ("authorized_calls", "Requests let through, per limit.", self.authorized_calls),
            (
                "authorized_hits",
                "Hits (tokens for token limits) added, per limit.",
                self.authorized_hits,
            ),
            ("limited_calls", "Requests refused, per limit.", self.limited_calls),
        )
        for name, help_, table in limitador:
            out += [f"# HELP {name} {help_}", f"# TYPE {name} counter"]
            for (ns, limit), value in sorted(table.items()):
                out.append(
                    f'{name}{{limitador_namespace="{_esc(ns)}",limit_name="{_esc(limit)}"}} {value}'
                )
        name = "tokengateway_requests_total"
        out += [f"# HELP {name} Requests answered, by route and status.", f"# TYPE {name} counter"]
        for (route, status), value in sorted(self.requests.items()):
            out.append(f'{name}{{route="{_esc(route)}",status="{status}"}} {value}')
        name = "tokengateway_tokens_total"
        out += [f"# HELP {name} Tokens used, by route and kind.", f"# TYPE {name} counter"]
        for (route, kind), value in sorted(self.tokens.items()):
            out.append(f'{name}{{route="{_esc(route)}",kind="{kind}"}} {value}')
        for name, help_, hists in (
            (
                "tokengateway_upstream_latency_seconds",
                "Seconds from forwarding to the end of the upstream's answer.",
                self.upstream,
            ),
            (
                "tokengateway_time_to_first_token_seconds",
                "Seconds from forwarding to a stream's first chunk.",
                self.first_token,
            ),
        ):
            out += [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
            for route, hist in sorted(hists.items()):
                out.extend(hist.lines(name, f'route="{_esc(route)}"'))
        name = "tokengateway_overhead_seconds"
        out += [
            f"# HELP {name} Seconds the gateway spent on a request outside the upstream.",
            f"# TYPE {name} histogram",
        ]
        out.extend(self.overhead.lines(name, ""))
        for gname, gtype, help_, gvalue in gauges:
            full = f"tokengateway_{gname}"
            out += [f"# HELP {full} {help_}", f"# TYPE {full} {gtype}", f"{full} {_num(gvalue)}"]
        return "\n".join(out) + "\n"


def merge(snapshots: Iterable[Mapping[str, Any]]) -> Snapshot:
    """The sum of snapshots (`Metrics.snapshot`): every counter and every histogram bucket
    and sum added per label set, a label set present in one only kept as is, and the
    figures added by name: gauges too (see `FIGURES`). Histograms of one series must have
    the same bounds (every worker runs the same code); ValueError otherwise."""
    out = Metrics().snapshot()
    for snap in snapshots:
        for name in _COUNTERS:
            table = out[name]
            for key, value in snap.get(name, {}).items():
                table[key] = table.get(key, 0) + value
        for name in _HISTOGRAMS:
            hists = out[name]
            for route, hist in snap.get(name, {}).items():
                hists[route] = _add_histograms(hists.get(route), hist, f"{name} of {route!r}")
        if "overhead" in snap:
            out["overhead"] = _add_histograms(out["overhead"], snap["overhead"], "overhead")
        figures = out["figures"]
        for key, value in snap.get("figures", {}).items():
            figures[key] = figures.get(key, 0) + value
    return out


def _add_histograms(mine: Snapshot | None, theirs: Mapping[str, Any], what: str) -> Snapshot:
    if mine is None:
        return {
            "bounds": list(theirs["bounds"]),
            "counts": list(theirs["counts"]),
            "sum": theirs["sum"],
        }
    if list(mine["bounds"]) != list(theirs["bounds"]) or len(mine["counts"]) != len(
        theirs["counts"]
    ):
        raise ValueError(f"cannot add histograms with different buckets ({what})")
    return {
        "bounds": mine["bounds"],
        "counts": [a + b for a, b in zip(mine["counts"], theirs["counts"], strict=True)],
        "sum": mine["sum"] + theirs["sum"],
    }


def process_snapshot(gateway: Any) -> Snapshot:
    """One gateway process's snapshot: its `GatewayApp`'s metrics and the figures of its
    counter store, counting itself as one worker. Call it on that process's event loop."""
    limiter = gateway.limiter
    return gateway.metrics.snapshot(
        {
            "usage_estimated_total": gateway.estimated_usage,
            "storage_errors_total": limiter.storage_errors,
            "storage_reports_pending": len(limiter.pending),
            "storage_reports_replayed_total": limiter.replayed,
            "storage_reports_dropped_total": limiter.dropped,
            "limited_kept_total": limiter.spent.hits,
            "workers": 1,
            "workers_unreported": 0,
            **limiter.store.figures(),
        }
    )


def render_snapshot(snap: Mapping[str, Any]) -> str:
    """A (merged) snapshot in the text format: its tables, then its figures in the order of
    `FIGURES` (a name not there is rendered as an untyped series)."""
    figures = snap.get("figures", {})
    known = [(n, *FIGURES[n], figures[n]) for n in FIGURES if n in figures]
    other = [(n, "untyped", n, figures[n]) for n in sorted(figures) if n not in FIGURES]
    return Metrics.from_snapshot(snap).render([*known, *other])


def _num(value: float) -> str:
    """Integers exactly (`:g` would write 1234567 as 1.23457e+06), other numbers in full."""
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return str(int(value))
    return repr(float(value))


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
