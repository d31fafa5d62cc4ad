"""Evicting policies: a scorer, a budget allocator and one selection, plus decode-time hooks.

A :class:`KeepPolicy` lets the prompt be prefilled exactly as full attention
does.  When a request starts decoding, ``select`` picks per layer and KV head
which prompt tokens the cache keeps; from then on attention reads only those
plus the generated tokens.  Policies that evict while generating (H2O,
decode-scope streaming) override ``evict`` / ``observe``.

Subclasses are small: SnapKV is ``WindowVotes`` + ``Uniform``, PyramidKV swaps
in ``Pyramid``, Ada-KV ``HeadAdaptive``; H2O is ``AccumulatedAttention`` with
decode-time eviction.  Any scorer composes with any allocator.
"""

from __future__ import annotations

import math

import torch

from casakv_vllm.observe.store import LayerObservation
from casakv_vllm.policies.base import Capabilities, Policy
from casakv_vllm.policies.budgets import Uniform
from casakv_vllm.policies.keepset import LayerKeep
from casakv_vllm.policies.scorers import ScoreInput, Scorer
from casakv_vllm.policies.selection import recency_keep, select_top, warn_once


class KeepPolicy(Policy):
    """Base of evicting policies.  Subclasses set ``scorer`` (and ``allocator``) in ``setup``,
    or replace ``select_scored`` altogether (positional or composed selections)."""

    scorer: Scorer | None = None
    allocator = Uniform()

    def capabilities(self) -> Capabilities:
        needs = self.scorer is not None and self.scorer.needs_col_sums
        return Capabilities(changes_prefill=False, evicts=True, needs_col_sums=needs,
                            observes_decode=type(self).observe is not KeepPolicy.observe)

    @classmethod
    def validate_config(cls, params, config) -> None:
        if config.kv_budget is None and config.kv_ratio is None:
            raise ValueError(f"{cls.name} needs kv_budget or kv_ratio")

    # --- the prompt's keep-set ---------------------------------------------------------------------

    def base_budget(self, prompt_len: int) -> int:
        """The configured per-head budget for a prompt of ``prompt_len`` tokens."""
        cfg = self.config
        if cfg.kv_budget is not None:
            return min(prompt_len, cfg.kv_budget)
        if cfg.kv_ratio is not None:
            return min(prompt_len, max(1, cfg.kv_min, math.ceil(cfg.kv_ratio * prompt_len)))
        return prompt_len

    def prompt_budget(self, layer: int, prompt_len: int) -> int:
        """Prompt tokens kept per KV head of ``layer`` (before generation)."""
        return self.allocator.layer_budget(layer, self.num_layers, prompt_len, self.base_budget(prompt_len))

    def pinned(self, prompt_len: int) -> int:
        """Tokens per head the scorer always keeps (``+inf`` scores)."""
        return 0

    def protect(self, num_kv: int, prompt_len: int, budget: int, device) -> torch.Tensor | None:
        """``[Hkv, L]`` positions kept before any score counts (None: none)."""
        return None

    def select(self, layer: int, prompt_len: int, keys: torch.Tensor, obs: LayerObservation | None,
               scale: float) -> torch.Tensor:
        """Keep-set of the prompt: ``[Hkv, prompt_len]`` bool on the keys' device.

        Args:
            keys: ``[Hkv, prompt_len, D]`` prompt keys (post-RoPE).
            obs: the prompt's observations at this layer (None if unknown).
        """
        return self.select_scored(layer, prompt_len, keys, obs, scale)[0]

    def select_scored(self, layer, prompt_len, keys, obs, scale) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(keep-set, scores)``; scores are None when the fallback was used."""
        num_kv, device = keys.shape[0], keys.device
        budget = self.prompt_budget(layer, prompt_len)
        if budget >= prompt_len:
            return torch.ones(num_kv, prompt_len, dtype=torch.bool, device=device), None
        scores = self.scorer.score(ScoreInput(layer, keys, obs, scale, budget, self.name))
        if scores is None:
            warn_once(self.name, "no observations of the prompt; keeping sinks + recent tokens")
            return recency_keep(num_kv, prompt_len, budget, device=device), None
        pinned = min(self.pinned(prompt_len), budget)
        budgets = self.allocator.head_budgets(scores, budget, pinned)
        bound = min(prompt_len, pinned + num_kv * (budget - pinned))
        return select_top(scores, budgets, self.protect(num_kv, prompt_len, budget, device), max_budget=bound), scores

    # --- compaction (``compress.rule``) -------------------------------------------------------------

    def compacts(self) -> bool:
        """Its keep-set can be compacted into fewer blocks: at the first decode step, then every
        ``chunk_size`` generated tokens (``compress.rule``).  Every evicting policy does."""
        return self.caps.evicts

    def selects_once(self) -> bool:
        """Its keep-set is chosen once and then only grows by generated tokens: no eviction or observation
        while generating (what prefill compression and the CUDA decode kernel over compacted blocks need)."""
        return self.caps.evicts and not self.caps.observes_decode and type(self).evict is KeepPolicy.evict

    def slot_budget(self, prompt_len: int, num_kv_heads: int) -> int:
        """The most prompt tokens any layer and KV head keeps: the compacted slots per head.
        Host ints only; the scheduler computes it too."""
        pinned = self.pinned(prompt_len)
        return max(self.allocator.max_head_budget(b, min(pinned, b), num_kv_heads, prompt_len)
                   for b in (self.prompt_budget(layer, prompt_len) for layer in range(self.num_layers)))

    # --- decode ------------------------------------------------------------------------------------

    def start(self, layer: int, prompt_len: int, keys: torch.Tensor, obs: LayerObservation | None,
              scale: float, seq_len: int) -> LayerKeep:
        """First decode step of a request at ``layer``: its keep-set (``keys``: ``[Hkv, >= prompt_len, D]``)."""
        return LayerKeep.new(self.select(layer, prompt_len, keys[:, :prompt_len], obs, scale), seq_len)

    def prepare_step(self, keep: LayerKeep, layer: int, prompt_len: int, seq_len: int,
                     width: int | None = None) -> None:
        """Before a decode step over ``seq_len`` positions, read through ``width`` live columns
        (default: the positions themselves): room for the new token, then eviction."""
        width = seq_len if width is None else width
        keep.grow(width)
        self.evict(keep, layer, prompt_len, seq_len, width)

    def evict(self, keep: LayerKeep, layer: int, prompt_len: int, seq_len: int, width: int) -> None:
        """Drop columns before the step reads the cache (default: keep every generated token)."""

    def on_event(self, keep: LayerKeep, layer: int, q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor,
                 scale: float, generated: int) -> None:
        """A later compaction event's step at ``layer``, after ``keep.rank`` was set from its query's
        attention (``q`` ``[H, 1, D]`` over live keys ``k`` ``[Hkv, W, D]``, ``allowed`` ``[Hkv, 1, W]``;
        ``generated`` tokens so far): a policy may re-profile heads and reshape what the compaction keeps
        (default: nothing)."""

    def on_prompt_event(self, keep: LayerKeep, layer: int, q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor,
                        scale: float, seq_len: int, chunk: int) -> None:
        """The compaction event of the prompt's last chunk (chunk-wise prefill compression), after
        ``keep.rank`` was set from the chunk's votes: ``q`` ``[H, n, D]`` the chunk's last queries, ``k``
        ``[Hkv, W, D]`` the live keys, ``pos`` ``[Hkv, W]`` their positions (-1: an empty slot), ``seq_len``
        positions so far, the last ``chunk`` of them this chunk's.  A policy may reshape the rank (what the
        compaction keeps) and record per-head state (default: nothing)."""

    def observe(self, keep: LayerKeep, probs: torch.Tensor) -> None:
        """After a decode step: ``probs`` ``[num_heads, 1, seq_len]`` (policies with ``observes_decode``)."""
