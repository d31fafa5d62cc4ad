"""StreamingLLM: attention sinks plus a window of recent tokens (the "A-shape")."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from casakv_kernels.patterns import PatternBatch
from casakv_vllm.policies.base import Capabilities
from casakv_vllm.policies.keep import KeepPolicy
from casakv_vllm.policies.keepset import LayerKeep
from casakv_vllm.policies.registry import register_policy


class StreamingParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    sink: int = Field(4, ge=0, description="leading tokens always kept")
    window: int | None = Field(None, ge=1, description="recent tokens kept; default: kv_budget/kv_ratio "
                               "(at least kv_min) minus sink")
    scope: Literal["all", "decode"] = Field(
        "all", description="'all': the A-shape mask from the first prefill token on (StreamingLLM); "
                           "'decode': full prefill, then the cache keeps only sinks + window (eviction)")


@register_policy
class StreamingPolicy(KeepPolicy):
    """Every head keeps ``sink`` first tokens and the most recent ``window``.

    The window comes from ``policy_params.window`` or, failing that, from the
    budget: ``kv_budget - sink`` tokens, or ``kv_ratio * seq_len - sink``
    (with ``scope='decode'``, ``seq_len`` is the prompt length, so the cache
    size stays fixed while generating).  ``scope='all'`` is a pattern policy;
    ``scope='decode'`` evicts.
    """

    name = "streaming"
    Params = StreamingParams

    def capabilities(self) -> Capabilities:
        if self.params.scope == "all":
            return Capabilities(changes_prefill=True, evicts=False, layer_dependent=False)
        return Capabilities(changes_prefill=False, evicts=True, layer_dependent=False)

    @classmethod
    def validate_config(cls, params: StreamingParams, config) -> None:
        if params.window is None and config.kv_budget is None and config.kv_ratio is None:
            raise ValueError("streaming needs policy_params.window, kv_budget or kv_ratio")
        if params.window is None and config.kv_budget is not None and config.kv_budget <= params.sink:
            raise ValueError(f"kv_budget={config.kv_budget} must exceed sink={params.sink}")

    def window_for(self, seq_len: int) -> int:
        p, cfg = self.params, self.config
        if p.window is not None:
            return p.window
        if cfg.kv_budget is not None:
            return cfg.kv_budget - p.sink
        return max(1, max(cfg.kv_min, round(cfg.kv_ratio * seq_len)) - p.sink)

    def patterns(self, layer, seq_lens, num_kv_heads, device) -> PatternBatch | None:
        if self.caps.evicts:
            return None
        pat = PatternBatch.local(len(seq_lens), num_kv_heads, self.params.sink, 1, device=device)
        windows = torch.tensor([self.window_for(n) for n in seq_lens], dtype=torch.int32, device=device)
        pat.window.copy_(windows[:, None].expand_as(pat.window))
        return pat

    def select_scored(self, layer, prompt_len, keys, obs, scale):
        keep = torch.zeros(keys.shape[0], prompt_len, dtype=torch.bool, device=keys.device)
        keep[:, : self.params.sink] = True
        keep[:, max(0, prompt_len - self.window_for(prompt_len)):] = True
        return keep, None

    def slot_budget(self, prompt_len: int, num_kv_heads: int) -> int:
        return min(prompt_len, self.params.sink + self.window_for(prompt_len))

    def start(self, layer, prompt_len, keys, obs, scale, seq_len) -> LayerKeep:
        state = super().start(layer, prompt_len, keys, obs, scale, seq_len)
        state.window = self.window_for(prompt_len)
        return state

    def evict(self, keep: LayerKeep, layer: int, prompt_len: int, seq_len: int, width: int) -> None:
        pos = keep.positions(width)
        keep.mask[:, :width] &= ~((pos >= self.params.sink) & (pos < seq_len - keep.window))
