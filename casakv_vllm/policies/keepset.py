"""A request's keep-set at one layer: which cached positions its decode steps read."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from casakv_vllm.ops.probs import group_sum

#: spare positions allocated past the current length (generated tokens to come)
SPARE = 64


@dataclass
class LayerKeep:
    """One layer's keep-set of one request, on the KV device.

    Attributes:
        mask: ``[Hkv, capacity]`` bool; position ``p`` is read iff
            ``mask[h, p]`` (positions past the sequence are ignored).
        scores: ``[Hkv, capacity]`` fp32 accumulated attention (H2O), or None.
        window: recent tokens kept by a sliding policy (decode-scope
            streaming), or None.
        pos: ``[Hkv, capacity]`` long, the position each column holds (-1: an empty
            slot), once the request's cache was compacted (``compress.compact``);
            None while columns are positions.  Columns are live slots then:
            eviction rules that speak of positions (a recent window, sinks) read
            ``positions``.
        rank: ``[Hkv, width]`` fp32, the attention of a compaction event's own query
            (set for that step only): what a select-once policy keeps when its
            compacted region overflows.
        program: ``[Hkv]`` long, each head's pattern program (``observe.estimate.PROGRAMS``)
            for policies that choose patterns per request (``casakv``), else None.
        summary: ``(mean keys [Hkv, blocks, D], counts [Hkv, blocks])`` of the tokens the
            first selection evicted, per block of positions (what re-profiling estimates
            their attention from), or None.
    """

    mask: torch.Tensor
    scores: torch.Tensor | None = None
    window: int | None = None
    pos: torch.Tensor | None = None
    rank: torch.Tensor | None = None
    program: torch.Tensor | None = None
    summary: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def new(cls, prompt_keep: torch.Tensor, seq_len: int) -> "LayerKeep":
        """From the prompt's keep-set ``[Hkv, prompt_len]``; later positions start kept."""
        num_kv, plen = prompt_keep.shape
        mask = torch.ones(num_kv, max(seq_len, plen) + SPARE, dtype=torch.bool, device=prompt_keep.device)
        mask[:, :plen] = prompt_keep
        return cls(mask)

    @property
    def capacity(self) -> int:
        return self.mask.shape[1]

    def grow(self, seq_len: int) -> None:
        """Make room for ``seq_len`` columns (new ones start kept, with zero score)."""
        if self.capacity >= seq_len:
            return
        mask = torch.ones(self.mask.shape[0], 2 * seq_len, dtype=torch.bool, device=self.mask.device)
        mask[:, :self.capacity] = self.mask
        self.mask = mask
        if self.scores is not None:
            scores = torch.zeros(self.scores.shape[0], 2 * seq_len, device=self.scores.device)
            scores[:, :self.scores.shape[1]] = self.scores
            self.scores = scores
        if self.pos is not None:  # the columns past the last one are the next positions
            old = self.pos.shape[1]
            more = self.pos[:, -1:] + torch.arange(1, 2 * seq_len - old + 1, device=self.pos.device)
            self.pos = torch.cat([self.pos, more], dim=1)

    def positions(self, width: int) -> torch.Tensor:
        """``[Hkv, width]`` positions of the first ``width`` columns (-1: an empty slot)."""
        if self.pos is None:
            return torch.arange(width, device=self.mask.device).expand(self.mask.shape[0], width)
        return self.pos[:, :width]

    def accumulate(self, probs: torch.Tensor) -> None:
        """Add a decode step's attention ``probs`` ``[num_heads, 1, width]`` to ``scores`` (per KV head)."""
        acc = self.scores
        acc[:, : probs.shape[-1]] += group_sum(probs, acc.shape[0]).reshape(acc.shape[0], -1)

    def set_rank(self, values: torch.Tensor) -> None:
        """``rank`` from ``[Hkv, width]`` scores of the first ``width`` columns (the rest rank 0)."""
        self.rank = torch.zeros(self.mask.shape, device=values.device)
        self.rank[:, :values.shape[1]] = values

    def visible(self, seq_len: int) -> torch.Tensor:
        """``[Hkv, seq_len]`` bool: what a step over ``seq_len`` positions reads (a view)."""
        return self.mask[:, :seq_len]
