"""Metrics snapshots and their sum (what the leader of `serve --workers N` shows)."""

from __future__ import annotations

import pickle
import re

import pytest

from tokengateway.observability.metrics import (
    FIGURES,
    LATENCY_BUCKETS,
    OVERHEAD_BUCKETS,
    Metrics,
    merge,
    render_snapshot,
)

A = "default/route-a"
B = "default/route-b"
FREE = "gateway-system/p/free"
GOLD = "gateway-system/p/gold"

_SAMPLE = re.compile(
    r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_]+="(?:[^"\\]|\\.)*",?)*\})? (\S+)$'
)
_LABEL = re.compile(r'([a-zA-Z_]+)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The text format, strictly: every line a HELP, a TYPE or a sample; each series once."""
    assert text.endswith("\n")
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    typed: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram", "untyped"), line
            assert name not in typed, f"{name} typed twice"
            typed[name] = kind
            continue
        found = _SAMPLE.match(line)
        assert found, f"not a sample: {line!r}"
        name, labels, value = found.groups()
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in typed or family in typed, f"{name} has no TYPE"
        key = (name, frozenset(_LABEL.findall(labels or "")))
        assert key not in samples, f"{line!r} twice"
        samples[key] = float(value)
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def _worker(
    route_a_200: int, route_b_200: int, free_hits: int, gold_hits: int, latency: float
) -> Metrics:
    m = Metrics()
    for _ in range(route_a_200):
        m.authorized(A, [FREE])
        m.hits(A, [FREE], [free_hits])
        m.request(A, 200, 3, 7, latency, None, 0.0002)
    for _ in range(route_b_200):
        m.authorized(B, [GOLD])
        m.hits(B, [GOLD], [gold_hits])
        m.request(B, 200, 5, 5, latency, latency / 2, 0.0002)
    return m


def test_merge_sums_counters_histograms_and_figures() -> None:
    one = _worker(route_a_200=2, route_b_200=0, free_hits=10, gold_hits=0, latency=0.02)
    one.limited(A, FREE)
    one.request(A, 429, 0, 0, None, None, None)
    two = _worker(route_a_200=3, route_b_200=1, free_hits=10, gold_hits=10, latency=3.0)
    two.limited(A, FREE)
    two.limited(A, FREE)
    two.request(A, 429, 0, 0, None, None, None)
    two.request(A, 429, 0, 0, None, None, None)
    figures_one = {"storage_errors_total": 1, "storage_reports_pending": 2, "workers": 1}
    figures_two = {"storage_errors_total": 4, "storage_reports_pending": 0, "workers": 1}
    # what goes over the channel: pickled and back
    snaps = [
        pickle.loads(pickle.dumps(m.snapshot(f)))
        for m, f in ((one, figures_one), (two, figures_two))
    ]
    merged = merge(snaps)

    # counters: overlapping label sets add, the others are kept
    assert merged["authorized_calls"] == {(A, FREE): 5, (B, GOLD): 1}
    assert merged["authorized_hits"] == {(A, FREE): 50, (B, GOLD): 10}
    assert merged["limited_calls"] == {(A, FREE): 3}
    assert merged["requests"] == {(A, "200"): 5, (A, "429"): 3, (B, "200"): 1}
    assert merged["tokens"] == {
        (A, "prompt"): 15,
        (A, "completion"): 35,
        (B, "prompt"): 5,
        (B, "completion"): 5,
    }
    # histograms: buckets and sums add per route; a route seen by one worker only is as is
    upstream_a = merged["upstream"][A]
    assert upstream_a["bounds"] == list(LATENCY_BUCKETS)
    fast, slow = LATENCY_BUCKETS.index(0.025), LATENCY_BUCKETS.index(5.0)
    assert upstream_a["counts"][fast] == 2 and upstream_a["counts"][slow] == 3
    assert sum(upstream_a["counts"]) == 5
    assert upstream_a["sum"] == pytest.approx(2 * 0.02 + 3 * 3.0)
    assert merged["upstream"][B] == two.upstream[B].snapshot()
    assert list(merged["first_token"]) == [B]
    assert sum(merged["overhead"]["counts"]) == 6
    assert merged["overhead"]["bounds"] == list(OVERHEAD_BUCKETS)
    assert merged["overhead"]["sum"] == pytest.approx(6 * 0.0002)
    # figures add, gauges too
    assert merged["figures"] == {
        "storage_errors_total": 5,
        "storage_reports_pending": 2,
        "workers": 2,
    }
    # merging left the inputs alone
    assert one.authorized_calls == {(A, FREE): 2}
    assert snaps[0]["upstream"][A]["counts"][fast] == 2

    samples = parse(render_snapshot(merged))
    assert value(samples, "authorized_calls", limitador_namespace=A, limit_name=FREE) == 5
    assert value(samples, "authorized_hits", limitador_namespace=B, limit_name=GOLD) == 10
    assert value(samples, "limited_calls", limitador_namespace=A, limit_name=FREE) == 3
    assert value(samples, "tokengateway_requests_total", route=A, status="200") == 5
    assert value(samples, "tokengateway_requests_total", route=A, status="429") == 3
    assert value(samples, "tokengateway_tokens_total", route=A, kind="completion") == 35
    name = "tokengateway_upstream_latency_seconds"
    assert value(samples, f"{name}_count", route=A) == 5
    assert value(samples, f"{name}_bucket", route=A, le="0.025") == 2  # cumulative
    assert value(samples, f"{name}_bucket", route=A, le="2.5") == 2
    assert value(samples, f"{name}_bucket", route=A, le="5") == 5
    assert value(samples, f"{name}_bucket", route=A, le="+Inf") == 5
    assert value(samples, f"{name}_sum", route=A) == pytest.approx(9.04)
    assert value(samples, "tokengateway_time_to_first_token_seconds_count", route=B) == 1
    assert value(samples, "tokengateway_overhead_seconds_count") == 6
    assert value(samples, "tokengateway_storage_errors_total") == 5
    assert value(samples, "tokengateway_storage_reports_pending") == 2
    assert value(samples, "tokengateway_workers") == 2


def test_a_snapshot_renders_as_its_metrics_do() -> None:
    m = _worker(route_a_200=2, route_b_200=1, free_hits=7, gold_hits=9, latency=0.3)
    m.limited(B, GOLD)
    figures = {name: i for i, name in enumerate(FIGURES)}
    gauges = [(name, *FIGURES[name], figures[name]) for name in FIGURES]
    assert render_snapshot(m.snapshot(figures)) == m.render(gauges)
    assert render_snapshot(merge([m.snapshot(figures)])) == m.render(gauges)
    assert Metrics.from_snapshot(m.snapshot()).render() == m.render()


def test_merge_of_nothing_and_of_empty_metrics() -> None:
    empty = parse(render_snapshot(merge([])))
    assert value(empty, "tokengateway_overhead_seconds_count") == 0
    assert parse(render_snapshot(merge([Metrics().snapshot(), Metrics().snapshot()]))) == empty


def test_large_figures_are_exact_and_unknown_ones_still_render() -> None:
    snap = Metrics().snapshot({"storage_errors_total": 12345678, "something_new": 0.5})
    samples = parse(render_snapshot(snap))
    assert value(samples, "tokengateway_storage_errors_total") == 12345678
    assert "tokengateway_storage_errors_total 12345678\n" in render_snapshot(snap)
    assert value(samples, "tokengateway_something_new") == 0.5


def test_histograms_with_different_buckets_are_refused() -> None:
    one, two = Metrics().snapshot(), Metrics().snapshot()
    two["overhead"]["bounds"] = [1.0]
    two["overhead"]["counts"] = [0, 0]
    with pytest.raises(ValueError, match="different buckets"):
        merge([one, two])


def test_retain_forgets_the_series_of_routes_no_longer_served() -> None:
    from tokengateway.observability.metrics import Metrics

    m = Metrics()
    for route in ("ns/kept", "ns/gone"):
        m.authorized(route, ["p/l"])
        m.request(route, 200, 3, 4, 0.01, None, 0.0001)
    m.retain({"ns/kept"})
    text = m.render()
    assert 'limitador_namespace="ns/kept"' in text and 'route="ns/kept"' in text
    assert "ns/gone" not in text
