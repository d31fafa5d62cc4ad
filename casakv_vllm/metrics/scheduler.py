"""Counters of the scheduler process (blocks freed by compaction), published like a worker's."""

from __future__ import annotations

import os

from casakv_vllm.metrics.worker import ENV_DIR, WorkerStats

_STATS: WorkerStats | None = None


def scheduler_stats() -> WorkerStats | None:
    """This process's counters (None when no metrics directory was set up)."""
    global _STATS
    if _STATS is None and os.environ.get(ENV_DIR):
        _STATS = WorkerStats(policy="scheduler").start_publishing()
    return _STATS
