"""StreamingLLM: attention sinks plus a window of recent tokens (the "A-shape")."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from casakv_vllm.policies.base import register_policy
from casakv_vllm.policies.keep import KeepPolicy
from casakv_vllm.triton_kernels.patterns import PatternBatch


class StreamingParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    sink: int = Field(4, ge=0, description="leading tokens always kept")
    window: int | None = Field(None, ge=1, description="recent tokens kept; default: kv_budget/kv_ratio minus sink")
    scope: Literal["all", "decode"] = Field(
        "all", description="'all': the A-shape mask from the first prefill token on (StreamingLLM); "
                           "'decode': full prefill, then the cache keeps only sinks + window (eviction)")


@register_policy
class StreamingPolicy(KeepPolicy):
    """Every head keeps ``sink`` first tokens and the most recent ``window``.

    The window comes from ``policy_params.window`` or, failing that, from the
    budget: ``kv_budget - sink`` tokens, or ``kv_ratio * seq_len - sink``
    (with ``scope='decode'``, ``seq_len`` is the prompt length, so the cache
    size stays fixed while generating).
    """

    name = "streaming"
    Params = StreamingParams
    layer_dependent = False

    def __init__(self, params, config=None):
        super().__init__(params, config)
        self.evicts = params.scope == "decode"
        self.changes_prefill = params.scope == "all"

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
        return max(1, round(cfg.kv_ratio * seq_len) - p.sink)

    def patterns(self, layer, seq_lens, num_kv_heads, device) -> PatternBatch | None:
        if self.evicts:
            return None
        pat = PatternBatch.local(len(seq_lens), num_kv_heads, self.params.sink, 1, device=device)
        windows = torch.tensor([self.window_for(n) for n in seq_lens], dtype=torch.int32, device=device)
        pat.window.copy_(windows[:, None].expand_as(pat.window))
        return pat

    def select(self, layer, prompt_len, k, obs, scale):
        keep = torch.zeros(k.shape[0], prompt_len, dtype=torch.bool)
        keep[:, : self.params.sink] = True
        keep[:, max(0, prompt_len - self.window_for(prompt_len)):] = True
        return keep

    def start(self, layer, state, prompt_len, k, obs, scale):
        state[("window", layer)] = self.window_for(prompt_len)
        return self.select(layer, prompt_len, k, obs, scale)

    def before_decode(self, layer, state, keep, prompt_len, seq_len):
        window = state[("window", layer)]
        keep[:, self.params.sink: max(self.params.sink, seq_len - window)] = False
