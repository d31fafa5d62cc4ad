"""casakv's Prometheus series, from worker processes to the API server's /metrics.

vLLM serves ``/metrics`` from the API-server process, while attention runs in
worker processes.  Workers therefore keep plain counters (:class:`WorkerStats`)
and publish snapshots as small JSON files in a directory shared through the
``CASAKV_METRICS_DIR`` environment variable, which the first process to load
the plugin (the API server) creates and its children inherit.  In the API
server a Prometheus collector (:class:`CasakvCollector`) sums those files on
every scrape.

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
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ENV_DIR = "CASAKV_METRICS_DIR"
_FLUSH_SECONDS = 0.1

_collector_installed = False
_collector_lock = threading.Lock()


@dataclass
class WorkerStats:
    """Counters of one worker process, written to ``<dir>/worker-<pid>.json``."""

    policy: str = "dense"
    prefill_tokens: int = 0
    decode_tokens: int = 0
    kv_tokens_attended: int = 0
    kv_tokens_causal: int = 0
    forward_calls: int = 0
    decode_kv: dict = field(default_factory=dict)  # policy label -> [attended, causal]
    _last_flush: float = field(default=0.0, repr=False)
    _dirty: bool = field(default=False, repr=False)

    def record(self, prefill_tokens: int, decode_tokens: int, kv_attended: int | None, kv_causal: int,
               decode_kv: dict[str, list[int]] | None = None) -> None:
        """Add one attention-layer forward call (host-side ints only).

        ``kv_attended=None`` (not known without a device sync) leaves both KV
        counters alone, so their ratio stays an honest density.  ``decode_kv``
        maps a policy label to ``[attended, causal]`` of its decode rows."""
        for label, (att, cau) in (decode_kv or {}).items():
            pair = self.decode_kv.setdefault(label, [0, 0])
            pair[0] += att
            pair[1] += cau
        self.prefill_tokens += prefill_tokens
        self.decode_tokens += decode_tokens
        if kv_attended is not None:
            self.kv_tokens_attended += kv_attended
            self.kv_tokens_causal += kv_causal
        self.forward_calls += 1
        self._dirty = True
        now = time.monotonic()
        if now - self._last_flush >= _FLUSH_SECONDS:
            self.flush(now)

    def snapshot(self) -> dict:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}

    def flush(self, now: float | None = None) -> None:
        directory = os.environ.get(ENV_DIR)
        self._last_flush = time.monotonic() if now is None else now
        if not directory or not self._dirty:
            return
        self._dirty = False
        target = Path(directory) / f"worker-{os.getpid()}.json"
        tmp = target.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(self.snapshot()))
            os.replace(tmp, target)
        except OSError:  # the API server may have removed the dir at shutdown
            pass


_worker_stats: WorkerStats | None = None


def worker_stats(policy: str) -> WorkerStats:
    """This process's counters (created on first use, flushed at exit and periodically)."""
    global _worker_stats
    if _worker_stats is None:
        _worker_stats = WorkerStats(policy=policy)
        atexit.register(_worker_stats.flush)
        _start_flusher(_worker_stats)
    return _worker_stats


def _start_flusher(stats: WorkerStats) -> None:
    def loop() -> None:
        while True:
            time.sleep(_FLUSH_SECONDS)
            if stats._dirty:
                stats.flush()

    threading.Thread(target=loop, name="casakv-metrics", daemon=True).start()


def read_worker_snapshots(directory: str | os.PathLike) -> list[dict]:
    snaps = []
    for path in sorted(Path(directory).glob("worker-*.json")):
        try:
            snaps.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # being replaced right now; next scrape sees it
    return snaps


class CasakvCollector:
    """Prometheus collector that sums the worker snapshots in ``directory``."""

    def __init__(self, directory: str):
        self.directory = directory

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from casakv_vllm import __version__

        snaps = read_worker_snapshots(self.directory)
        info = GaugeMetricFamily("casakv_info", "casakv-vllm version and policy of running workers", labels=["version", "policy"])
        for policy in sorted({s.get("policy", "?") for s in snaps}) or []:
            info.add_metric([__version__, policy], 1.0)
        tokens = CounterMetricFamily("casakv_tokens", "Query tokens through casakv attention layers, summed over layers", labels=["phase"])
        tokens.add_metric(["prefill"], float(sum(s.get("prefill_tokens", 0) for s in snaps)))
        tokens.add_metric(["decode"], float(sum(s.get("decode_tokens", 0) for s in snaps)))
        attended = CounterMetricFamily("casakv_kv_tokens_attended", "KV tokens read by casakv attention (layers x query tokens x KV heads)")
        attended.add_metric([], float(sum(s.get("kv_tokens_attended", 0) for s in snaps)))
        causal = CounterMetricFamily("casakv_kv_tokens_causal", "KV tokens full causal attention would read (same units)")
        causal.add_metric([], float(sum(s.get("kv_tokens_causal", 0) for s in snaps)))
        calls = CounterMetricFamily("casakv_forward_calls", "casakv attention-layer forward calls")
        calls.add_metric([], float(sum(s.get("forward_calls", 0) for s in snaps)))
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
        yield from (info, tokens, attended, causal, calls, dec_att, dec_cau)


def install_collector() -> None:
    """Create the shared metrics dir (first process only) and register the collector.

    Idempotent.  Child processes inherit ``CASAKV_METRICS_DIR`` and register a
    collector too, which is harmless: only the API server serves ``/metrics``.
    """
    global _collector_installed
    with _collector_lock:
        if _collector_installed:
            return
        directory = os.environ.get(ENV_DIR)
        if not directory:
            directory = tempfile.mkdtemp(prefix="casakv-metrics-")
            os.environ[ENV_DIR] = directory
            atexit.register(shutil.rmtree, directory, True)
        from prometheus_client import REGISTRY

        REGISTRY.register(CasakvCollector(directory))
        _collector_installed = True
