"""CASAK-V's own policy: each request's heads get a sparse pattern from the request's own attention,
the pattern decides what the compressed cache keeps, and decoding re-profiles heads whose pattern
stopped fitting.

When a request starts decoding, at every layer:

1. **Patterns.** The online estimator (``observe.estimate``) reads the attention of
   the prompt's last recorded queries (the observation window) and gives each KV
   head the cheapest pattern program reaching ``recall_threshold`` of that attention:
   sinks + window, vertical stripes, slash lines, both, or full.
2. **Budgets by need.** A head needs what its pattern covers at the next query (a
   window head its sinks and window, a stripe head its columns); ``full`` heads ask
   for the per-head budget.  ``budgets.ByNeed`` moves the layer's total between heads
   accordingly, and with ``across_layers`` the request's total moves between layers by
   their summed needs first (``budgets.across_layers``): every layer's patterns are
   estimated at the prompt's end (``on_prompt_observed``, in each layer's forward of the
   prompt's last chunk), so all needs are known before layer 0 selects.  A head still keeps
   at most ``(1 + spread)`` x the per-head budget, so the compacted region and the blocks
   freed do not change: tokens move, memory does not.
3. **Keep-sets.** Within its budget each head keeps its ``vote_share`` most-voted
   tokens first (SnapKV's pooled votes of the window's queries: a needle the queries
   ask for stays even in a window head), then its pattern's tokens, then the other
   voted tokens, and always the last ``pin`` prompt tokens.  The defaults (share 1,
   votes of the last ``vote_window`` = 32 queries) come from the quality suite: pattern
   tokens first lost retrieval, and so did votes of all 64 observed queries
   (``docs/decisions.md``, "casakv: keep order"), so the pattern decides each head's
   budget and a window head's later events, and the votes decide its tokens.  The
   evicted tokens' keys are summarised per block of ``SUMMARY_BLOCK`` positions (their
   mean and count).

It selects once, so the compression machinery compacts it and frees its blocks like
the other select-once policies, and CUDA's decode kernel serves the steps between
events.  At a later compaction event (every ``chunk_size`` generated tokens), every
``reprofile_interval`` tokens: each head's recall is estimated from the event
query's attention over the live cache against the summaries of what was evicted; a
head under ``recall_threshold`` is re-profiled to ``full``.  A window head's
compaction keeps its most recent tokens (and sinks); every other head keeps what the
event query attends to most.

With chunk-wise prefill compression (``prefill_compression``) each chunk's compaction ranks by
the chunk's votes, and at the prompt's last chunk the estimator picks the patterns from what the
cache still holds, and they decide what that compaction keeps (``on_prompt_event``).

Sparse prefill (``sparse_prefill``): from ``sparse_min_len`` tokens on, each prefill chunk of a request
that compacts is computed under patterns the estimator picks from the chunk's own last queries
(re-estimated as the sequence grows by ``REESTIMATE_GROWTH``), only the (query, key) pairs they allow
(``attention.sparse``: torch on the CPU build, the sparse paged kernel on CUDA).  Off by default: on the
CPU build it is slower than vLLM's kernel, and it loses retrieval (``docs/decisions.md``, "casakv: CPU
sparse prefill").

Pattern tokens rank ahead of voted ones by exact ranks (:func:`tiered`), never by adding a large
constant to the votes: that rounded votes of about 1e-3 into ties, so the order within a tier was the
sort's tie-breaking, which differs between the CPU and CUDA.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from pydantic import BaseModel, ConfigDict, Field

from casakv_vllm.observe.tally import TALLY
from casakv_vllm.observe.estimate import ASHAPE, FULL, EstimatorConfig, estimate_patterns
from casakv_vllm.observe.store import LayerObservation
from casakv_vllm.ops.probs import grouped_logits
from casakv_vllm.policies.base import Capabilities
from casakv_vllm.policies.budgets import ByNeed, across_layers
from casakv_vllm.policies.keep import KeepPolicy
from casakv_vllm.policies.keepset import LayerKeep
from casakv_vllm.policies.registry import register_policy
from casakv_vllm.policies.scorers import ScoreInput, pooled, window_scores
from casakv_vllm.policies.selection import recency_keep, select_top, warn_once

#: positions per evicted-key summary (mean key and count, per KV head)
SUMMARY_BLOCK = 128
#: sparse prefill re-estimates a layer's patterns once the sequence grew this much since its last estimate
REESTIMATE_GROWTH = 1.5
#: what puts a window head's most-attended tokens ahead of its recent ones at a decode event (above any position)
RECENT_FIRST = 2.0 ** 21


class CasakvParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    recall_threshold: float = Field(0.95, gt=0.0, le=1.0,
                                    description="attention recall a head's pattern must reach")
    reprofile_interval: int | None = Field(256, ge=1, description="generated tokens between re-profiles (a "
                                           "multiple of chunk_size: they run at compaction events; null: never)")
    pin: int = Field(32, ge=0, le=64, description="last prompt tokens every head keeps")
    vote_window: int = Field(32, ge=1, le=64, description="last prompt queries whose attention votes for tokens "
                             "(the estimator reads every observed one)")
    kernel: int = Field(7, ge=1, le=63, description="max-pool width over the window's votes (odd)")
    floor: float = Field(0.2, ge=0.0, le=1.0, description="share of the per-head budget every head keeps")
    spread: float = Field(0.25, ge=0.0, le=3.0, description="a head keeps at most (1 + spread) x the per-head "
                          "budget (the compacted region is that wide)")
    sparse_prefill: bool = Field(False, description="prefill computes only what each chunk's estimated patterns "
                                 "allow (a request that compacts; torch on the CPU build, the sparse kernel on CUDA)")
    sparse_min_len: int = Field(2048, ge=1, description="sequence length from which prefill chunks are sparse")
    context_votes: float = Field(0.0, ge=0.0, le=1.0, description="weight of the context's accumulated "
                                 "attention (every context query's, H2O's statistic) in the votes when a context "
                                 "is compressed before its question arrives (casakv_question_at); above 0 every "
                                 "prefill also records column sums (an extra attention pass)")
    vote_share: float = Field(1.0, ge=0.0, le=1.0, description="share of a head's budget its most-voted tokens "
                              "take before its pattern's tokens (a needle a window head's queries vote for stays)")
    across_layers: bool = Field(True, description="budgets move between layers by need too, the request's total "
                                "fixed (patterns estimated at the prompt's end; a head still keeps at most "
                                "(1 + spread) x the per-head budget)")


def pattern_columns(patterns, prompt_len: int, device) -> torch.Tensor:
    """``[Hkv, prompt_len]`` bool: the prompt tokens each head's pattern covers for the next query
    (position ``prompt_len``): sinks and window, stripe columns, and the keys its slash lines cross."""
    cols = torch.arange(prompt_len, device=device)
    sink = patterns.sink[0].long().unsqueeze(1)
    window = patterns.window[0].long().unsqueeze(1)
    mask = (cols < sink) | ((cols >= prompt_len - window) & (window > 0))
    hits = torch.zeros(mask.shape, dtype=torch.int32, device=device)
    vert = patterns.vertical[0].long()
    hits.scatter_add_(1, vert.clamp(0, prompt_len - 1), (vert >= 0).to(torch.int32))
    key = prompt_len - 1 - patterns.slash[0].long()  # the last prompt query's diagonals
    hits.scatter_add_(1, key.clamp(0, prompt_len - 1), ((patterns.slash[0] >= 0) & (key >= 0)).to(torch.int32))
    return mask | (hits > 0)


def _places(order: torch.Tensor) -> torch.Tensor:
    """``[Hkv, L]``: each token's place in ``order`` (0: first)."""
    num_kv, length = order.shape
    return torch.empty_like(order).scatter_(1, order, torch.arange(length, device=order.device).expand(num_kv, -1))


def top_share(votes: torch.Tensor, budgets: torch.Tensor | int, share: float) -> torch.Tensor:
    """``[Hkv, L]`` bool: each head's ``share x budget`` highest-voted tokens (``budgets``: int or ``[Hkv]``;
    equal votes: the earlier token first, on every device)."""
    num_kv = votes.shape[0]
    count = (torch.as_tensor(budgets, device=votes.device) * share).long().expand(num_kv)
    return _places(votes.argsort(dim=1, descending=True, stable=True)) < count.unsqueeze(1)


def tiered(votes: torch.Tensor, tier: torch.Tensor) -> torch.Tensor:
    """``[Hkv, L]`` fp32 scores that rank by ``tier`` (higher first), then by ``votes`` within a tier, then
    the earlier token: each token's rank from the end, an exact integer.  (Adding a large constant per tier
    to the votes would round votes of about 1e-3 away and leave the order within a tier to the sort's
    tie-breaking, which differs between devices.)"""
    order = votes.argsort(dim=1, descending=True, stable=True)
    order = order.gather(1, tier.gather(1, order).argsort(dim=1, descending=True, stable=True))
    return (votes.shape[1] - _places(order)).float()


def evicted_summary(keys: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean key and count of the evicted tokens (``~keep``) per block of ``SUMMARY_BLOCK`` positions."""
    num_kv, length, dim = keys.shape
    blocks = -(-length // SUMMARY_BLOCK)
    pad = blocks * SUMMARY_BLOCK - length
    gone = torch.nn.functional.pad((~keep).to(keys.dtype), (0, pad))  # [Hkv, blocks * SUMMARY_BLOCK]
    evicted = torch.nn.functional.pad(keys * gone[:, :length].unsqueeze(-1), (0, 0, 0, pad))  # keys' dtype
    sums = evicted.view(num_kv, blocks, SUMMARY_BLOCK, dim).sum(2, dtype=torch.float32)
    counts = gone.view(num_kv, blocks, SUMMARY_BLOCK).sum(2, dtype=torch.float32)
    return (sums / counts.clamp_min(1.0).unsqueeze(-1)).to(keys.dtype), counts


def estimated_recall(q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor, summary, scale: float) -> torch.Tensor:
    """``[Hkv]``: the share of ``q``'s attention the live cache holds, the evicted tokens' share estimated
    from their block summaries (each block as its count times its mean key's weight)."""
    num_kv = k.shape[0]
    logits = grouped_logits(q, k, scale).masked_fill(~allowed, float("-inf"))  # [Hkv, g, W]
    kept = torch.logsumexp(logits, dim=-1)
    means, counts = summary
    est = grouped_logits(q, means, scale) + counts.log().unsqueeze(1)  # [Hkv, g, blocks]; empty: -inf
    evicted = torch.logsumexp(est, dim=-1)
    return torch.sigmoid(kept - evicted).view(num_kv, -1).mean(1)


@register_policy
class CasakvPolicy(KeepPolicy):
    """Per-request, per-head patterns from the estimator; pattern-derived keep-sets; re-profiling."""

    name = "casakv"
    Params = CasakvParams

    def setup(self) -> None:
        self.allocator = ByNeed(self.params.floor, self.params.spread)
        self.estimator = EstimatorConfig(threshold=self.params.recall_threshold)

    @classmethod
    def validate_config(cls, params, config) -> None:
        super().validate_config(params, config)
        every = params.reprofile_interval
        if every is not None and (config.chunk_size is None or every % config.chunk_size):
            raise ValueError(f"reprofile_interval={every} must be a multiple of chunk_size={config.chunk_size} "
                             f"(re-profiling runs at compaction events), or null")

    def pinned(self, prompt_len: int) -> int:
        return min(self.params.pin, prompt_len)

    def select_scored(self, layer, prompt_len, keys, obs, scale):
        return self.start_keep(layer, prompt_len, keys, obs, scale)[:2]

    def start(self, layer: int, prompt_len: int, keys: torch.Tensor, obs: LayerObservation | None,
              scale: float, seq_len: int) -> LayerKeep:
        mask, _, program, summary = self.start_keep(layer, prompt_len, keys[:, :prompt_len], obs, scale)
        keep = LayerKeep.new(mask, seq_len)
        keep.program, keep.summary = program, summary
        return keep

    def observes_prompt_end(self) -> bool:
        # with prefill compression the prompt's last event estimates from what the cache holds instead
        return self.params.across_layers and not self.config.prefill_compression

    def on_prompt_observed(self, layer: int, obs: LayerObservation, keys: torch.Tensor, scale: float) -> None:
        """The prompt's end, at every layer: its patterns (and what they cover), so that the first decode step
        knows every layer's need before layer 0 selects (``across_layers``).  Not for a prompt kept whole."""
        if self.prompt_budget(layer, keys.shape[1]) >= keys.shape[1]:
            return
        est = self._estimate(obs, keys, scale)
        if est is not None:
            covered = pattern_columns(est.patterns, keys.shape[1], keys.device).sum(1)
            obs.notes[(self.name, self.estimator, layer)] = (est, covered)

    def _estimate(self, obs: LayerObservation | None, keys: torch.Tensor, scale: float):
        """The estimator over the prompt's observed last queries (None: their rows are not all recorded)."""
        rows = obs.seen_rows(len(obs.window_seen)) if obs is not None else []
        if not rows or len(rows) != rows[-1] - rows[0] + 1:
            return None
        first = keys.shape[1] - len(obs.window_seen) + rows[0]
        return estimate_patterns(obs.window_q[:, rows[0]:rows[-1] + 1], keys, first, scale, self.estimator)

    def layer_total(self, obs: LayerObservation | None, layer: int, budget: int, pinned: int,
                    prompt_len: int) -> torch.Tensor | None:
        """``layer``'s share of the request's tokens when every layer's need was noted at the prompt's end
        (``budgets.across_layers``, computed once per prompt); None: ``Hkv x budget``, as without it."""
        if not self.params.across_layers or obs is None:
            return None
        key = (self.name, self.estimator, "totals", budget, pinned, self.allocator.floor, self.allocator.spread)
        if key not in obs.notes:
            noted = [obs.notes.get((self.name, self.estimator, i)) for i in range(self.num_layers)]
            if any(n is None for n in noted):
                return None
            needs = torch.stack([torch.where(est.program == FULL, budget, covered + pinned) for est, covered in noted])
            obs.notes[key] = across_layers(self.allocator, needs, budget, pinned, prompt_len)
        return obs.notes[key][layer]

    def capabilities(self) -> Capabilities:
        return replace(super().capabilities(), needs_col_sums=self.params.context_votes > 0)

    def _context_votes(self, votes: torch.Tensor, obs: LayerObservation, prompt_len: int) -> torch.Tensor:
        """A context compressed before its question: its last queries' votes speak for the text near them,
        not for what a question will ask; mix in what every context query attended to (``context_votes``,
        each normalised to one per head), when those column sums were recorded."""
        w = self.params.context_votes
        if w <= 0 or not obs.question_later or obs.col_sums is None or obs.col_rows < prompt_len:
            return votes
        acc = obs.col_sums[:, :prompt_len]
        return ((1 - w) * votes / votes.sum(1, keepdim=True).clamp_min(1e-12)
                + w * acc / acc.sum(1, keepdim=True).clamp_min(1e-12))

    def start_keep(self, layer, prompt_len, keys, obs, scale):
        """``(keep [Hkv, L], scores, program [Hkv] | None, evicted summary | None)``."""
        num_kv, device = keys.shape[0], keys.device
        budget = self.prompt_budget(layer, prompt_len)
        if budget >= prompt_len:
            return torch.ones(num_kv, prompt_len, dtype=torch.bool, device=device), None, None, None
        noted = obs.notes.get((self.name, self.estimator, layer)) if obs is not None else None
        est = noted[0] if noted is not None else self._estimate(obs, keys, scale)
        if est is None:
            warn_once(self.name, "no observations of the prompt's last queries; keeping sinks + recent tokens")
            return recency_keep(num_kv, prompt_len, budget, device=device), None, None, None
        rows = obs.seen_rows(len(obs.window_seen))
        TALLY.add_programs(est.program)
        covered = pattern_columns(est.patterns, prompt_len, device)
        pinned = self.pinned(prompt_len)
        full = est.program == FULL
        need = torch.where(full, budget, covered.sum(1) + pinned)
        total = self.layer_total(obs, layer, budget, pinned, prompt_len)
        budgets = self.allocator.by_need(need, budget, pinned, prompt_len, total)
        votes = window_scores(ScoreInput(layer, keys, obs, scale, budget, self.name),
                              min(len(rows), self.params.vote_window))
        votes = pooled(self._context_votes(votes, obs, prompt_len), self.params.kernel)
        first = top_share(votes, budgets, self.params.vote_share)
        scores = tiered(votes, torch.where(first, 2, (covered & ~full.unsqueeze(1)).long()))
        scores[:, prompt_len - pinned:] = float("inf")  # kept first, the latest first (``select_top``)
        bound = self.allocator.max_head_budget(budget, pinned, num_kv, prompt_len)
        keep = select_top(scores, budgets, max_budget=bound)
        return keep, scores, est.program, evicted_summary(keys, keep)

    def sparse_prefill_from(self, prompt_len: int) -> float:
        return self.params.sparse_min_len if self.params.sparse_prefill else float("inf")

    def prefill_patterns(self, store: dict, layer: int, q: torch.Tensor, keys, context_len: int, seq_len: int,
                         scale: float, final: bool = False, obs: LayerObservation | None = None):
        """The estimator reads the chunk's last queries at the first sparse chunk, whenever the sequence has
        grown by ``REESTIMATE_GROWTH`` since the layer's last estimate, and at the prompt's last chunk
        (``final``: its queries, a question's, may look where the text before them did not); chunks between
        reuse the last estimate (windows, stripe columns and slash offsets carry over to later queries).  The
        chunk that ends the observed prompt reuses the patterns ``on_prompt_observed`` noted from the same
        last queries and keys in this layer call, instead of estimating them twice."""
        noted = obs.notes.get((self.name, self.estimator, layer)) if obs is not None else None
        if noted is not None and final:
            store[layer] = (seq_len, noted[0].patterns)
            return noted[0].patterns
        last = store.get(layer)
        if last is None or final or seq_len >= REESTIMATE_GROWTH * last[0]:
            n = min(q.shape[1], self.estimator.last_q)
            store[layer] = (seq_len, estimate_patterns(q[:, -n:], keys(), context_len, scale,
                                                       self.estimator).patterns)
        return store[layer][1]

    def on_prompt_event(self, keep: LayerKeep, layer: int, q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor,
                        scale: float, seq_len: int, chunk: int) -> None:
        """Chunk-wise prefill compression, the prompt's last chunk: the estimator reads the chunk's last
        queries over what the cache still holds (placed at their positions), and the compaction keeps each
        head's pattern tokens first, then the votes, and always the last ``pin`` tokens.  (The tokens earlier
        chunks evicted are gone, so no summary of them is kept: such a request is not re-profiled.)"""
        num_kv, width, dim = k.shape
        valid = (pos >= 0) & (pos < seq_len)
        slot = torch.where(valid, pos, seq_len)  # empty slots land on a spare row, then dropped: no host sync
        dense = torch.zeros(num_kv, seq_len + 1, dim, dtype=k.dtype, device=k.device)
        dense.scatter_(1, slot.unsqueeze(-1).expand(num_kv, width, dim), k)
        present = torch.zeros(num_kv, seq_len + 1, dtype=torch.bool, device=k.device).scatter_(1, slot, valid)
        est = estimate_patterns(q, dense[:, :seq_len], seq_len - chunk, scale, self.estimator,
                                present=present[:, :seq_len])
        TALLY.add_programs(est.program)
        covered = torch.nn.functional.pad(pattern_columns(est.patterns, seq_len, k.device), (0, 1))
        mine = covered.gather(1, slot) & valid & (est.program != FULL).unsqueeze(1)
        votes = keep.rank[:, :width]  # the rank spans the keep's capacity
        first = top_share(votes.masked_fill(~valid, float("-inf")), self.prompt_budget(layer, seq_len),
                          self.params.vote_share) & valid
        rank = tiered(votes, torch.where(first, 2, mine.long())).masked_fill(~valid, float("-inf"))
        keep.rank[:, :width] = rank.masked_fill(valid & (pos >= seq_len - self.pinned(seq_len)), float("inf"))
        keep.program = est.program

    def on_event(self, keep: LayerKeep, layer: int, q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor,
                 scale: float, generated: int) -> None:
        if keep.program is None:
            return
        every = self.params.reprofile_interval
        if every is not None and keep.summary is not None and generated % every < (self.config.chunk_size or 1):
            recall = estimated_recall(q, k, allowed, keep.summary, scale)
            checked = keep.program != FULL
            low = (recall < self.params.recall_threshold) & checked
            keep.program = torch.where(low, FULL, keep.program)
            TALLY.add_reprofiled(checked.sum(), low.sum())
        window = (keep.program == ASHAPE).unsqueeze(1)  # window heads keep sinks, their most-attended, the latest
        width = keep.rank.shape[1]
        pos = keep.positions(width).float()
        first = top_share(keep.rank, keep.mask[:, :width].sum(1), self.params.vote_share)
        recency = torch.where(pos < self.estimator.sink, float("inf"), pos + RECENT_FIRST * first)
        keep.rank = torch.where(window, recency, keep.rank)
