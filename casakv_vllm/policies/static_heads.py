"""Static per-head pattern assignment, searched offline (MInference-style).

An offline search (``casakv eval search-heads``) assigns every (layer, KV head)
one pattern type; the indices are then found per request from the prompt's
last queries, as MInference does.  Types, each filling the same budget:

- ``a-shape``: 4 sink tokens + the most recent tokens (no scores needed);
- ``vertical``: the most-attended columns (single tokens) + a short recent window;
- ``block``: the most-attended 16-token blocks + a short recent window.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from casakv_vllm.policies.base import register_policy
from casakv_vllm.policies.keep import KeepPolicy, recency_keep, topk_keep, warn_once, window_scores

HEAD_TYPES = ("a-shape", "vertical", "block")
BLOCK = 16
RECENT = 32
SINK = 4


class StaticHeadsParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    assignment: str = Field(..., description="JSON file from `casakv eval search-heads`")
    window: int = Field(64, ge=1, le=64, description="last prompt queries used to find columns/blocks")


def load_assignment(path: str) -> list[list[str]]:
    """``heads[layer][kv_head]`` -> type; ValueError (one line) if unusable."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"assignment={path!r}: no such file")
    try:
        heads = json.loads(p.read_text())["heads"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"assignment={path!r}: not a head-assignment file ({type(err).__name__})") from None
    bad = {t for row in heads for t in row} - set(HEAD_TYPES)
    if not heads or bad:
        raise ValueError(f"assignment={path!r}: unknown head types {sorted(bad)}; allowed: {', '.join(HEAD_TYPES)}")
    return heads


def keep_for_type(kind: str, scores: torch.Tensor | None, prompt_len: int, budget: int) -> torch.Tensor:
    """One head's keep-set ``[prompt_len]`` for pattern ``kind`` (scores ``[prompt_len]``)."""
    if budget >= prompt_len:
        return torch.ones(prompt_len, dtype=torch.bool)
    if kind == "a-shape" or scores is None:
        return recency_keep(1, prompt_len, budget, sink=SINK)[0]
    recent = min(RECENT, budget // 2)
    protect = torch.zeros(1, prompt_len, dtype=torch.bool)
    protect[0, prompt_len - recent:] = True
    if kind == "vertical":
        return topk_keep(scores.unsqueeze(0), budget, protect)[0]
    # block: rank 16-token blocks by their summed score, fill the budget block by block
    keep = protect[0].clone()
    nblocks = -(-prompt_len // BLOCK)
    padded = torch.zeros(nblocks * BLOCK)
    padded[:prompt_len] = scores.masked_fill(protect[0], 0.0)
    order = torch.argsort(padded.view(nblocks, BLOCK).sum(1), descending=True)
    left = budget - recent
    for b in order.tolist():
        if left <= 0:
            break
        lo, hi = b * BLOCK, min(prompt_len, (b + 1) * BLOCK)
        free = (~keep[lo:hi]).nonzero().flatten()[:left] + lo
        keep[free] = True
        left -= free.numel()
    return keep


@register_policy
class StaticHeadsPolicy(KeepPolicy):
    name = "static-heads"
    Params = StaticHeadsParams

    def __init__(self, params, config=None):
        super().__init__(params, config)
        self.heads = load_assignment(params.assignment)

    @classmethod
    def validate_config(cls, params, config) -> None:
        super().validate_config(params, config)
        load_assignment(params.assignment)

    def select(self, layer, prompt_len, k, obs, scale):
        budget = self.prompt_budget(layer, prompt_len)
        row = self.heads[layer % len(self.heads)]
        scores = window_scores(obs, k, self.params.window, scale)
        if scores is None:
            warn_once(self.name, "no observations of the prompt; a-shape for every head")
        keep = torch.zeros(k.shape[0], prompt_len, dtype=torch.bool)
        for h in range(k.shape[0]):
            kind = row[h % len(row)]
            keep[h] = keep_for_type(kind, None if scores is None else scores[h], prompt_len, budget)
        return keep
