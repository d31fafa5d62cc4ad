"""The API server's side of casakv's Prometheus series: a collector summing the workers' snapshots.

Series (all prefixed ``casakv_``):

- ``casakv_info{version,policy}``: 1, one per worker configuration.
- ``casakv_tokens_total{phase}``: query tokens attended by casakv layers
  (``phase`` = prefill | decode), summed over layers.
- ``casakv_kv_tokens_attended_total`` / ``casakv_kv_tokens_causal_total``:
  KV tokens attention actually read vs. what full causal attention would read,
  summed over layers, query tokens and KV heads.  Their ratio is the attention
  density (1.0 for the dense policy).
- ``casakv_forward_calls_total``: attention-layer forward calls.
- ``casakv_decode_kv_tokens_attended_total{policy}`` /
  ``casakv_decode_kv_tokens_causal_total{policy}``: the same two counts for
  decode steps only, per policy label (``snapkv/kv_budget=256``; requests may
  choose their own policy).  Their ratio is the KV kept at decode, measured.
- ``casakv_requests_live``: request states the workers hold;
  ``casakv_requests_released_total``: states released because their request
  ended (finished or aborted); ``casakv_request_restarts_total``: requests
  recomputed from scratch after a preemption.
- ``casakv_kv_blocks_freed_total``: KV blocks compaction returned to vLLM's
  pool; ``casakv_compression_ratio``: histogram, per compacted request, of the
  blocks it holds over the blocks dense attention would hold;
  ``casakv_compaction_seconds``: summary of the time workers spent compacting
  (one observation per layer and request).
- ``casakv_heads{pattern}``: pattern assignments of (request, layer, KV head)
  the ``casakv`` policy made since start, by pattern (a-shape, vertical,
  slash, vertical-slash, block, full); ``casakv_reprofile_checks_total``:
  heads whose pattern a decode check measured (every ``reprofile_interval``
  tokens); ``casakv_reprofile_total``: heads it re-profiled while decoding.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

from casakv_vllm.metrics.worker import ENV_DIR, RATIO_BUCKETS

_installed = False
_lock = threading.Lock()


def read_worker_snapshots(directory: str | os.PathLike) -> list[dict]:
    snaps = []
    for path in sorted(Path(directory).glob("worker-*.json")):
        try:
            snaps.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # being replaced right now; next scrape sees it
    return snaps


def _total(snaps: list[dict], key: str) -> float:
    return float(sum(s.get(key, 0) for s in snaps))


class CasakvCollector:
    """Prometheus collector that sums the worker snapshots in ``directory``."""

    def __init__(self, directory: str):
        self.directory = directory

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from casakv_vllm import __version__

        snaps = read_worker_snapshots(self.directory)
        info = GaugeMetricFamily("casakv_info", "casakv-vllm version and policy of running workers",
                                 labels=["version", "policy"])
        for policy in sorted({s.get("policy", "?") for s in snaps} - {"scheduler"}):
            info.add_metric([__version__, policy], 1.0)
        tokens = CounterMetricFamily("casakv_tokens", "Query tokens through casakv attention layers, summed over layers",
                                     labels=["phase"])
        tokens.add_metric(["prefill"], _total(snaps, "prefill_tokens"))
        tokens.add_metric(["decode"], _total(snaps, "decode_tokens"))
        singles = [
            (CounterMetricFamily, "casakv_kv_tokens_attended",
             "KV tokens read by casakv attention (layers x query tokens x KV heads)", "kv_tokens_attended"),
            (CounterMetricFamily, "casakv_kv_tokens_causal", "KV tokens full causal attention would read (same units)",
             "kv_tokens_causal"),
            (CounterMetricFamily, "casakv_forward_calls", "casakv attention-layer forward calls", "forward_calls"),
            (GaugeMetricFamily, "casakv_requests_live", "Request states held by casakv workers", "requests_live"),
            (CounterMetricFamily, "casakv_requests_released",
             "Request states released because the request finished or was aborted", "requests_released"),
            (CounterMetricFamily, "casakv_request_restarts",
             "Requests recomputed from scratch (preempted, then resumed)", "request_restarts"),
        ]
        families = [info, tokens]
        for family, name, doc, key in singles:
            metric = family(name, doc)
            metric.add_metric([], _total(snaps, key))
            families.append(metric)
        dec_att = CounterMetricFamily("casakv_decode_kv_tokens_attended",
                                      "KV tokens read by decode steps, per policy label (KV kept, over layers x heads)",
                                      labels=["policy"])
        dec_cau = CounterMetricFamily("casakv_decode_kv_tokens_causal",
                                      "KV tokens full attention would read at those decode steps", labels=["policy"])
        labels: dict[str, list[float]] = {}
        for snap in snaps:
            for label, (att, cau) in snap.get("decode_kv", {}).items():
                pair = labels.setdefault(label, [0.0, 0.0])
                pair[0] += att
                pair[1] += cau
        for label, (att, cau) in sorted(labels.items()):
            dec_att.add_metric([label], att)
            dec_cau.add_metric([label], cau)
        yield from families + [dec_att, dec_cau] + list(_compression_families(snaps))


def _compression_families(snaps: list[dict]):
    from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                        SummaryMetricFamily)

    freed = CounterMetricFamily("casakv_kv_blocks_freed", "KV blocks compaction returned to vLLM's pool")
    freed.add_metric([], _total(snaps, "kv_blocks_freed"))
    counts = [0.0] * (len(RATIO_BUCKETS) + 1)
    for snap in snaps:
        for i, c in enumerate(snap.get("compression", [])[: len(counts)]):
            counts[i] += c
    cumulative, buckets = 0.0, []
    for bound, c in zip([*map(str, RATIO_BUCKETS), "+Inf"], counts):
        cumulative += c
        buckets.append((bound, cumulative))
    ratio = HistogramMetricFamily("casakv_compression_ratio",
                                  "Per compacted request: KV blocks held over the blocks dense attention holds")
    ratio.add_metric([], buckets, _total(snaps, "compression_sum"))
    seconds = SummaryMetricFamily("casakv_compaction_seconds", "Time workers spent compacting (per layer and request)")
    seconds.add_metric([], _total(snaps, "compactions"), _total(snaps, "compaction_seconds"))
    heads = GaugeMetricFamily("casakv_heads", "Pattern assignments of (request, layer, KV head) made by the "
                              "casakv policy since start, by pattern", labels=["pattern"])
    by_pattern: dict[str, float] = {}
    for snap in snaps:
        for pattern, n in snap.get("heads", {}).items():
            by_pattern[pattern] = by_pattern.get(pattern, 0.0) + n
    for pattern, n in sorted(by_pattern.items()):
        heads.add_metric([pattern], n)
    reprofiles = CounterMetricFamily("casakv_reprofile", "Heads re-profiled while decoding (their pattern's "
                                     "estimated attention recall fell under recall_threshold)")
    reprofiles.add_metric([], _total(snaps, "reprofiles"))
    checks = CounterMetricFamily("casakv_reprofile_checks", "Heads whose pattern a decode check measured against "
                                 "the query's attention (every reprofile_interval tokens)")
    checks.add_metric([], _total(snaps, "reprofile_checks"))
    yield from (freed, ratio, seconds, heads, reprofiles, checks)


def install_collector() -> None:
    """Create the shared metrics dir (first process only) and register the collector.

    Idempotent.  Child processes inherit ``CASAKV_METRICS_DIR`` and register a
    collector too, which is harmless: only the API server serves ``/metrics``.
    """
    global _installed
    with _lock:
        if _installed:
            return
        directory = os.environ.get(ENV_DIR)
        if not directory:
            directory = tempfile.mkdtemp(prefix="casakv-metrics-")
            os.environ[ENV_DIR] = directory
            atexit.register(shutil.rmtree, directory, True)
        from prometheus_client import REGISTRY

        REGISTRY.register(CasakvCollector(directory))
        _installed = True
