"""The block-manager plugin: vLLM's full-attention manager, plus freeing the blocks compaction emptied.

:class:`CompressingManager` subclasses vLLM's ``FullAttentionManager`` and
changes three things for requests whose policy compacts
(``compress.rule``), leaving every other request exactly as stock vLLM
serves it:

- ``remove_skipped_blocks`` (vLLM calls it at every scheduling of a running
  request, with the processed-token count: tokens whose forward has settled)
  frees the request's blocks ``[head_end, T_j)`` once the forward of
  compaction event ``j`` has settled: ``[head_end, tail_start)`` after the
  first decode step, then one chunk of generated tokens' blocks after each
  later event.  Like vLLM's R-SWA manager it puts ``null_block`` in their
  place, so the other blocks keep their logical index and the slot mapping
  of new tokens does not change.
- ``cache_blocks`` hashes only the request's shared prefix (``[0, shared)``):
  the blocks compaction writes into or frees never enter the prefix cache, so
  no other request can hit content that is about to move.  A request with a
  question (``casakv_question_at``) hashes none of the blocks its question
  touches either: its question attends through the context's keep-set, so its
  KV is not full attention's (``question_cap``).
- a prefill-compressing request (``prefill_compression``) is admitted on the blocks it will hold at
  most (``CompactionTerms.peak_tokens``), not on its whole prompt: that is how compression lets more
  long requests run at once.
- per-request terms live from the request's first allocation until its blocks
  are popped for freeing (finish, abort and preemption).  A preempted request is not
  compacted again (``scheduler.CasakvScheduler`` makes its recompute skip the
  prefix cache, so its worker sees the restart too).

The scheduler (:class:`~casakv_vllm.integration.scheduler.CasakvScheduler`)
attaches the request table and the policy resolver after construction.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

from casakv_vllm.compress.rule import CompactionTerms, compaction_terms
from casakv_vllm.requests.params import question_at, request_overrides


def question_cap(request, block_size: int) -> int | None:
    """For a request with a question: the block-aligned end of its context, the most of its prompt it may
    read from or give to the prefix cache (its question's KV depends on its policy); None without one."""
    params = getattr(request, "sampling_params", None)
    try:
        question = question_at(params.extra_args if params is not None else None, request.num_prompt_tokens)
    except ValueError:  # validated in the API server
        return None
    return None if question is None else question // block_size * block_size


@dataclass
class _Life:
    terms: CompactionTerms | None
    freed_to: int = -1  # logical blocks [head_end / B, freed_to) are freed (-1: none yet)


class CompressingManager(FullAttentionManager):
    """Full attention whose compacted requests give their emptied blocks back to the pool."""

    requests: dict | None = None  # the scheduler's request_id -> Request
    resolver = None  # casakv's PolicyResolver (server config + per-request overrides)
    on_free = None  # callback(blocks_freed, held, dense, first_event), for metrics

    def attach(self, requests: dict, resolver, on_free=None, max_step_tokens: int = 0) -> None:
        self.requests, self.resolver, self.on_free = requests, resolver, on_free
        self.max_step_tokens = max_step_tokens  # the scheduler's token budget per step
        self._lives: dict[str, _Life] = {}
        self._first_context: dict[str, int] = {}
        self.blocks_freed = 0  # by compaction, since start

    # --- the request's terms ---------------------------------------------------------------------

    def _terms_of(self, request_id: str) -> CompactionTerms | None:
        life = self._lives.get(request_id) if self.resolver is not None else None
        return life.terms if life is not None else None

    def get_num_blocks_to_allocate(self, request_id, num_tokens, new_computed_blocks, total_computed_tokens,
                                   *args, **kwargs) -> int:
        if self.resolver is not None and request_id not in self._lives:
            self._first_context[request_id] = total_computed_tokens  # the prefix-cache hit of this life
            if kwargs.get("apply_admission_cap"):  # admission reserves what the request will hold at most
                terms = self._new_terms(request_id, pop=False)
                if terms is not None and terms.prefill:
                    num_tokens = min(num_tokens, terms.peak_tokens(self.max_step_tokens))
        return super().get_num_blocks_to_allocate(request_id, num_tokens, new_computed_blocks,
                                                  total_computed_tokens, *args, **kwargs)

    def allocate_new_blocks(self, request_id: str, num_tokens: int, num_tokens_main_model: int):
        if self.resolver is not None and request_id not in self._lives:
            self._lives[request_id] = _Life(self._new_terms(request_id))
        return super().allocate_new_blocks(request_id, num_tokens, num_tokens_main_model)

    def _new_terms(self, request_id: str, pop: bool = True) -> CompactionTerms | None:
        request = self.requests.get(request_id) if self.requests is not None else None
        first = (self._first_context.pop if pop else self._first_context.get)(request_id, 0)
        if request is None or request.num_preemptions > 0 or request.sampling_params is None:
            return None
        try:
            overrides = request_overrides(request.sampling_params.extra_args)
            question = question_at(request.sampling_params.extra_args, request.num_prompt_tokens)
        except ValueError:  # validated in the API server; never fail the engine here
            return None
        policy, _ = self.resolver.resolve(overrides)
        return compaction_terms(policy, request.num_prompt_tokens, first, self.block_size,
                                self.kv_cache_spec.num_kv_heads, question)

    # --- vLLM's hooks ----------------------------------------------------------------------------

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        super().remove_skipped_blocks(request_id, processed_computed_tokens, num_prompt_tokens)
        life = self._lives.get(request_id) if self.resolver is not None else None
        if life is None or life.terms is None:
            return
        tail = life.terms.settled_tail(processed_computed_tokens)
        if tail is None:
            return
        first = life.freed_to < 0
        start = life.terms.head_end // self.block_size if first else life.freed_to
        stop = tail // self.block_size
        if stop <= start:
            return
        self._remove_blocks_in_range(request_id, start, stop)
        life.freed_to = stop
        self.blocks_freed += stop - start
        if self.on_free is not None:
            blocks = self.req_to_blocks.get(request_id, [])
            held = sum(1 for b in blocks if not b.is_null)
            self.on_free(stop - start, held, len(blocks), first)

    def cache_blocks(self, request, num_tokens: int, *args, **kwargs) -> None:
        terms = self._terms_of(request.request_id)
        if terms is not None:
            num_tokens = min(num_tokens, terms.shared)
        cap = question_cap(request, self.block_size) if self.resolver is not None else None
        if cap is not None:
            num_tokens = min(num_tokens, cap)
        super().cache_blocks(request, num_tokens, *args, **kwargs)

    def pop_blocks_for_free(self, request_id: str):
        """Finish, abort and preemption (``free`` calls this too): the request's terms go with its blocks."""
        if self.resolver is not None:
            self._lives.pop(request_id, None)
            self._first_context.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)

    def live_requests(self) -> int:
        """Requests with terms held (tests: nothing is left when all requests end)."""
        return len(self._lives) if self.resolver is not None else 0
