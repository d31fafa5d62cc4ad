"""Counters of one worker process, published for the API server's ``/metrics``.

vLLM serves ``/metrics`` from the API-server process, while attention runs in
worker processes.  Workers therefore keep plain counters (:class:`WorkerStats`)
and publish snapshots as small JSON files in a directory shared through the
``CASAKV_METRICS_DIR`` environment variable, which the first process to load
the plugin (the API server) creates and its children inherit
(``metrics.collector`` sums them on every scrape).
"""

from __future__ import annotations

import atexit
import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ENV_DIR = "CASAKV_METRICS_DIR"
FLUSH_SECONDS = 0.1
#: upper bounds of the ``casakv_compression_ratio`` histogram (blocks held / blocks dense would hold)
RATIO_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0)


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
    requests_live: int = 0  # request states held (gauge)
    requests_released: int = 0  # states released when their request ended
    request_restarts: int = 0  # requests recomputed from scratch (preemption)
    kv_blocks_freed: int = 0  # blocks compaction returned to vLLM's pool (scheduler process)
    compression: list = field(default_factory=lambda: [0] * (len(RATIO_BUCKETS) + 1))  # histogram counts
    compression_sum: float = 0.0
    compaction_seconds: float = 0.0  # time spent compacting (worker processes)
    compactions: int = 0  # (layer, request) compactions
    heads: dict = field(default_factory=dict)  # pattern program -> (request, layer, KV head) assignments
    reprofile_checks: int = 0  # heads whose pattern a decode check measured
    reprofiles: int = 0  # heads re-profiled while decoding
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
        self.touch()

    def record_free(self, freed: int, held: int, dense: int, first: bool = True) -> None:
        """A request's compacted blocks went back to the pool: it now holds ``held`` of ``dense``.
        The compression ratio is observed once per request, at its first compaction."""
        self.kv_blocks_freed += freed
        if not first:
            self.touch()
            return
        ratio = held / dense if dense else 1.0
        self.compression[next((i for i, b in enumerate(RATIO_BUCKETS) if ratio <= b), len(RATIO_BUCKETS))] += 1
        self.compression_sum += ratio
        self.touch()

    def record_compaction(self, seconds: float) -> None:
        self.compaction_seconds += seconds
        self.compactions += 1
        self.touch()

    def set_requests(self, live: int, released: int, restarts: int) -> None:
        if (live, released, restarts) != (self.requests_live, self.requests_released, self.request_restarts):
            self.requests_live, self.requests_released, self.request_restarts = live, released, restarts
            self.touch()

    def touch(self) -> None:
        self._dirty = True
        now = time.monotonic()
        if now - self._last_flush >= FLUSH_SECONDS:
            self.flush(now)

    def snapshot(self) -> dict:
        from casakv_vllm.observe.tally import TALLY

        self.heads, self.reprofile_checks, self.reprofiles = TALLY.read()
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

    def start_publishing(self) -> "WorkerStats":
        """Flush at exit and every ``FLUSH_SECONDS`` while dirty (a daemon thread)."""
        atexit.register(self.flush)

        def loop() -> None:
            while True:
                time.sleep(FLUSH_SECONDS)
                if self._dirty:
                    self.flush()

        threading.Thread(target=loop, name="casakv-metrics", daemon=True).start()
        return self
