"""Static per-head pattern assignment, searched offline (MInference-style).

An offline search (``casakv eval search-heads``) assigns every (layer, KV head)
one pattern type; the indices are then found per request from the prompt's
last queries, as MInference does.  Types, each filling the same budget:

- ``a-shape``: 4 sink tokens + the most recent tokens (no scores needed);
- ``vertical``: the most-attended columns (single tokens) + a short recent window;
- ``block``: the most-attended 16-token blocks + a short recent window.

Each type is a way of scoring a head's tokens (``AssignedPatterns``); the one
selection then keeps the budget's best per head.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from casakv_vllm.policies.keep import KeepPolicy
from casakv_vllm.policies.registry import register_policy
from casakv_vllm.policies.scorers import ScoreInput, Scorer, recency_scores, window_scores
from casakv_vllm.policies.selection import warn_once

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


def block_ranks(scores: torch.Tensor, recent: torch.Tensor) -> torch.Tensor:
    """``-rank`` of each position when 16-token blocks are taken by summed score (best block
    first, positions in order inside a block); ``recent`` positions (``[L]`` bool) do not count."""
    length = scores.shape[0]
    nblocks = -(-length // BLOCK)
    padded = torch.zeros(nblocks * BLOCK, device=scores.device)
    padded[:length] = scores.masked_fill(recent, 0.0)
    order = torch.argsort(padded.view(nblocks, BLOCK).sum(1), descending=True)
    place = torch.empty_like(order)
    place[order] = torch.arange(nblocks, device=scores.device)
    pos = torch.arange(length, device=scores.device)
    return -(place[pos // BLOCK] * BLOCK + pos % BLOCK).float()


def type_scores(kind: str, votes: torch.Tensor | None, prompt_len: int, budget: int, device=None) -> torch.Tensor:
    """One head's scores ``[L]`` for pattern ``kind`` (``+inf`` = kept first); ``votes``: window votes or None."""
    if kind == "a-shape" or votes is None:
        return recency_scores(1, prompt_len, min(SINK, budget // 2), device)[0]
    recent = torch.zeros(prompt_len, dtype=torch.bool, device=votes.device)
    recent[prompt_len - min(RECENT, budget // 2):] = True
    scores = votes.float() if kind == "vertical" else block_ranks(votes, recent)
    return scores.masked_fill(recent, float("inf"))


@dataclass
class AssignedPatterns(Scorer):
    """Scores each head by its assigned type (``heads[layer][kv_head]``) from the window's votes."""

    heads: list[list[str]]
    window: int = 64

    def score(self, x: ScoreInput) -> torch.Tensor:
        num_kv, plen, _ = x.keys.shape
        row = self.heads[x.layer % len(self.heads)]
        votes = window_scores(x, self.window)
        if votes is None:
            warn_once(x.policy, "no observations of the prompt; a-shape for every head")
        return torch.stack([type_scores(row[h % len(row)], None if votes is None else votes[h], plen, x.budget,
                                        x.keys.device) for h in range(num_kv)])


@register_policy
class StaticHeadsPolicy(KeepPolicy):
    name = "static-heads"
    Params = StaticHeadsParams

    def setup(self) -> None:
        self.scorer = AssignedPatterns(load_assignment(self.params.assignment), self.params.window)

    @classmethod
    def validate_config(cls, params, config) -> None:
        super().validate_config(params, config)
        load_assignment(params.assignment)
