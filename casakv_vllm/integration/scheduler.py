"""vLLM's scheduler with casakv's block-manager plugin in it (``--attention-backend casakv``).

Two twins, one per scheduling mode: :class:`CasakvScheduler` (synchronous, the
CPU platform's only mode) and :class:`CasakvAsyncScheduler` (vLLM's async
scheduling, the CUDA default, where the scheduler plans step ``n + 1`` before
step ``n``'s output is back).  The same rule serves both: vLLM hands the
managers the *processed* token count (computed tokens minus those still in
flight), so blocks are freed only once the forward that compacted out of
them has returned its output, however far ahead scheduling runs.

vLLM builds its KV-cache managers inside the scheduler, from a registry of
KV-cache specs.  :class:`CasakvScheduler` (named in ``scheduler_cls`` at
start-up, so vLLM builds it in the engine-core process) points the registry's
full-attention entry at :class:`~casakv_vllm.integration.kv_manager.CompressingManager`
before the managers are built, then hands each one the request table and the
policy resolver.  vLLM's own spec registration runs first (registering before
it would stop the built-ins from registering).

Two more changes.  At preemption, a request whose policy compacts recomputes
without reading the prefix cache, so its worker sees it start again from
position 0 (and neither side compacts it in its second life).  A request with
a question (``casakv_question_at``) reads from the prefix cache no further
than its context's last full block: it computes its question itself, through
its context's keep-set (``kv_manager.question_cap``).
"""

from __future__ import annotations

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from casakv_vllm.integration.kv_manager import CompressingManager, question_cap

PATH = f"{__name__}.CasakvScheduler"
ASYNC_PATH = f"{__name__}.CasakvAsyncScheduler"


def use_compressing_manager(vllm_config) -> None:
    """Full-attention layers get :class:`CompressingManager` in this process."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec
    from vllm.v1.kv_cache_spec_registry import (_REGISTRY_KVCACHESPEC_LIST, KVCacheSpecMetadata,
                                                KVCacheSpecRegistry)

    KVCacheSpecRegistry._ensure_registered(vllm_config)
    _REGISTRY_KVCACHESPEC_LIST[FullAttentionSpec] = KVCacheSpecMetadata(FullAttentionSpec, CompressingManager,
                                                                        FullAttentionSpec)


def compaction_enabled(vllm_config) -> bool:
    """True when the scheduler frees compacted blocks (so workers compact): the same answer in every process."""
    cls = vllm_config.scheduler_config.scheduler_cls
    return cls in (PATH, ASYNC_PATH) or cls in (CasakvScheduler, CasakvAsyncScheduler)


class _Compressing:
    """What both twins add to vLLM's scheduler (a mixin before the vLLM class)."""

    def __init__(self, vllm_config, *args, **kwargs) -> None:
        use_compressing_manager(vllm_config)
        super().__init__(vllm_config, *args, **kwargs)
        from casakv_vllm.metrics.scheduler import scheduler_stats
        from casakv_vllm.requests.resolve import resolver_for

        resolver = resolver_for(vllm_config)
        stats = scheduler_stats()
        self.compressing_managers = [m for m in self.kv_cache_manager.coordinator.single_type_managers
                                     if isinstance(m, CompressingManager)]
        for manager in self.compressing_managers:
            manager.attach(self.requests, resolver, stats.record_free if stats is not None else None,
                           vllm_config.scheduler_config.max_num_batched_tokens)

    def _get_local_prefix_cache_hit(self, request):
        blocks, hit, *rest = super()._get_local_prefix_cache_hit(request)
        cap = question_cap(request, self.compressing_managers[0].block_size) if self.compressing_managers else None
        if cap is not None and hit > cap:
            blocks, hit = self.kv_cache_manager.truncate_computed_blocks(blocks, cap), cap
        return (blocks, hit, *rest)

    def _preempt_request(self, request, *args, **kwargs) -> None:
        if any(m._terms_of(request.request_id) is not None for m in self.compressing_managers):
            request.skip_reading_prefix_cache = True
        super()._preempt_request(request, *args, **kwargs)


class CasakvScheduler(_Compressing, Scheduler):
    """Synchronous scheduling."""


class CasakvAsyncScheduler(_Compressing, AsyncScheduler):
    """Async scheduling (one step ahead)."""
