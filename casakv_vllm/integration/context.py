"""The casakv state one worker process shares between vLLM's objects.

vLLM builds the request tracker (a logits processor), the metadata builders
and the attention layers separately; they meet here.  A worker process runs
one engine, so there is one context per process, created on first use.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from casakv_vllm.metrics.worker import WorkerStats
from casakv_vllm.observe.store import ObservationStore
from casakv_vllm.requests.state import RequestTable


@dataclass
class WorkerContext:
    """Attributes:
        requests: the rows of the persistent batch and each request's state
            (installed by the tracker; None when no tracker runs, e.g. a
            pooling model).
        observations: the prompts' observations (per prompt, on the KV device).
        stats: this worker's counters for ``/metrics`` (None: metrics off).
    """

    requests: RequestTable | None = None
    observations: ObservationStore = field(default_factory=ObservationStore)
    stats: WorkerStats | None = None

    def stats_for(self, policy: str, enabled: bool) -> WorkerStats | None:
        if enabled and self.stats is None:
            self.stats = WorkerStats(policy=policy).start_publishing()
        return self.stats


_CONTEXT: WorkerContext | None = None


def worker_context() -> WorkerContext:
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = WorkerContext()
    return _CONTEXT
