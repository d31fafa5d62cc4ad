"""The Grafana dashboard: every panel's PromQL is readable by the preview engine and names real series."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from deploy_helpers import CHART, REPO

sys.path.insert(0, str(REPO / "scripts"))
from promql_lite import Parser, evaluate, metric_names, parse_scrapes  # noqa: E402

DASHBOARD = json.loads((CHART / "dashboards/casakv-vllm.json").read_text())
SCRAPE = REPO / "docs/assets/metrics-scrape.txt"
# series the runtime is gaining while this is written (their panels show "no data yet" until then)
PLANNED: set[str] = set()
SUFFIXES = ("_bucket", "_sum", "_count", "_total")
TARGETS = [(p["title"], t["expr"]) for p in DASHBOARD["panels"] for t in p.get("targets", [])]


def family(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def exported_names() -> set[str]:
    """Metric families vLLM 0.32 and casakv's collector define (read from their sources)."""
    import vllm
    import casakv_vllm.metrics.collector as collector

    names = set()
    for path in (Path(vllm.__file__).parent / "v1/metrics").glob("*.py"):
        names |= set(re.findall(r'"(vllm:[a-z_]+)"', path.read_text()))
    names |= {"vllm:e2e_request_latency_seconds"}  # built from a prefix + suffix in vLLM's source
    names |= set(re.findall(r'"(casakv_[a-z_]+)"', Path(collector.__file__).read_text()))
    return {family(n) for n in names}


def test_dashboard_covers_the_issue():
    titles = " | ".join(p["title"] for p in DASHBOARD["panels"]).lower()
    for words in ("kv cache usage", "blocks freed", "compression ratio", "heads per pattern", "re-profiles",
                  "latency", "throughput"):
        assert words in titles, words
    assert DASHBOARD["uid"] and DASHBOARD["schemaVersion"] >= 36
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("title,expr", TARGETS, ids=[f"{t}:{e[:40]}" for t, e in TARGETS])
def test_expression_names_real_series(title, expr):
    names = {family(n) for n in metric_names(Parser(expr, {"$__rate_interval": "1m"}).parse())}
    unknown = names - exported_names() - {family(n) for n in PLANNED}
    assert names and not unknown, unknown


def test_preview_engine_against_hand_computed_values():
    text = ("# scrape t=0\nc_total{p=\"a\"} 10\nc_total{p=\"b\"} 0\nh_bucket{le=\"1\"} 0\nh_bucket{le=\"2\"} 0\n"
            "h_bucket{le=\"+Inf\"} 0\ng 3\n"
            "# scrape t=10\nc_total{p=\"a\"} 30\nc_total{p=\"b\"} 5\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"2\"} 4\n"
            "h_bucket{le=\"+Inf\"} 4\ng 5\n")
    scrapes = parse_scrapes(text)

    def at(expr, i=1):
        return evaluate(Parser(expr, {}).parse(), scrapes, i)

    assert at("sum(rate(c_total[1m]))") == {frozenset(): 2.5}
    assert at("sum by (p) (rate(c_total[1m]))") == {frozenset({("p", "a")}): 2.0, frozenset({("p", "b")}): 0.5}
    assert at("histogram_quantile(0.75, sum by (le) (rate(h_bucket[1m])))") == {frozenset(): 1.5}
    assert at("max(g) / 2") == {frozenset(): 2.5}
    assert at("rate(c_total[1m])", 0) == {}  # one sample: no rate yet
    with pytest.raises(ValueError):
        Parser("quantile_over_time(0.5, g[1m])", {}).parse()


def test_committed_scrape_shows_compression():
    """The preview's data: a real run under snapkv at 4x, with blocks freed and ratios near 0.25-0.5."""
    scrapes = parse_scrapes(SCRAPE.read_text(), {"namespace": "x", "pod": "p"})
    assert len(scrapes) >= 10
    last = len(scrapes) - 1

    def value(expr):
        return list(evaluate(Parser(expr, {}).parse(), scrapes, last).values())

    assert value("sum(casakv_kv_blocks_freed_total)")[0] > 0
    mean = value("sum(casakv_compression_ratio_sum) / sum(casakv_compression_ratio_count)")[0]
    assert 0.2 < mean < 0.6
    assert value("sum(vllm:generation_tokens_total)")[0] > 0
    assert (REPO / "docs/assets/dashboard-preview.png").stat().st_size > 50_000
