"""Held-out attention recall and density of estimated patterns, for one layer of one prompt.

A *chunk* is the query rows ``start .. end - 1`` of a prompt (the whole prompt, or one prefill chunk).
The estimator (``observe.estimate.estimate_patterns``) sees what serving gives it at the end of that
chunk: the chunk's last ``last_q`` queries and every key up to ``end`` (and, for the block program, the
chunk's queries pooled per block of 64).  The measure is taken on the chunk's *held-out* rows, the
queries before those last ``last_q`` (all of them, or ``rows`` evenly spaced ones):

- recall of a KV head: the share of a held-out query's softmax attention (averaged over the GQA group's
  query heads) that falls on keys the head's pattern allows, averaged over the held-out queries;
- density of a KV head: allowed causal (query, key) pairs / causal pairs, over the same queries.

"Allowed" is ``casakv_kernels.patterns.pattern_mask``, the definition every kernel reads.  ``allowed_mask``
computes the same mask without a pass per slash / vertical slot (over a thousand per pattern otherwise);
``evaluate_chunk(check=True)`` compares the two on a few rows and raises on a difference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from casakv_kernels.patterns import PatternBatch, pattern_mask
from casakv_vllm.observe.estimate import PROGRAMS, EstimatorConfig, estimate_patterns
from casakv_vllm.ops.probs import attention_probs, group_sum

#: query rows whose probabilities are held at once (``[H, ROW_BATCH, S]`` fp32)
ROW_BATCH = 512
#: rows per chunk on which ``allowed_mask`` is checked against ``pattern_mask``
CHECK_ROWS = 4
STATIC = "a-shape (static)"


@dataclass(frozen=True)
class Variant:
    """One estimator setting to measure: its recall ``threshold``, and whether the block program competes."""

    threshold: float
    block: bool = True

    @property
    def name(self) -> str:
        return f"t={self.threshold:g}" + (" +block" if self.block else "")


@dataclass
class HeadResult:
    """Per KV head of one (chunk, layer, variant), all ``[Hkv]`` on the host."""

    program: list[str]
    recall: list[float]  # held-out
    density: list[float]  # held-out rows' causal area
    est_recall: list[float]  # the estimator's own, on the rows it saw


def allowed_mask(p: PatternBatch, r: int, q_pos: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``pattern_mask(p, r, q_pos, seq_len)`` (``[H, Q, seq_len]`` bool), built from per-head column and
    diagonal tables instead of one pass per slash / vertical slot."""
    device = p.full.device
    h = p.num_heads
    q = q_pos.to(device).long().view(1, -1, 1)
    k = torch.arange(seq_len, device=device).view(1, 1, -1)
    dist = q - k  # [1, Q, S]
    cols = torch.zeros(h, seq_len + 1, dtype=torch.bool, device=device)  # slot seq_len: unused (-1) and beyond
    vert = p.vertical[r].long()
    cols.scatter_(1, torch.where((vert >= 0) & (vert < seq_len), vert, seq_len), True)
    span = max(int(q_pos.max()) + 1, 1)
    diags = torch.zeros(h, span + 1, dtype=torch.bool, device=device)
    sl = p.slash[r].long()
    diags.scatter_(1, torch.where((sl >= 0) & (sl < span), sl, span), True)
    diags[:, 0] = True  # the diagonal
    diags[:, :span] |= torch.arange(span, device=device).view(1, -1) < p.window[r].long().view(h, 1)
    cols[:, :seq_len] |= torch.arange(seq_len, device=device).view(1, -1) < p.sink[r].long().view(h, 1)
    causal = dist >= 0
    allowed = diags.gather(1, dist.clamp(0, span).flatten().expand(h, -1)).view(h, *dist.shape[1:])
    allowed |= cols[:, :seq_len].unsqueeze(1)
    allowed |= p.full[r].view(h, 1, 1)
    if p.blocks is not None:
        qb = (q.flatten() // p.block).clamp(max=p.blocks.shape[2] - 1)
        kb = (k.flatten() // p.block).clamp(max=p.blocks.shape[3] - 1)
        allowed |= p.blocks[r][:, qb][:, :, kb]
    return allowed & causal


def static_window(rows: torch.Tensor, sink: int, density: float) -> int:
    """The longest window whose sink + window pattern keeps the density of ``rows`` (absolute query
    positions) at or under ``density`` (at least 1)."""
    causal = float((rows + 1).sum())
    lo, hi = 1, int(rows.max()) + 1
    while lo < hi:  # density grows with the window: the last window that fits
        mid = (lo + hi + 1) // 2
        if float(torch.clamp(rows + 1, max=sink + mid).sum()) / causal <= density:
            lo = mid
        else:
            hi = mid - 1
    return lo


def held_out_rows(start: int, end: int, last_q: int, rows: int) -> torch.Tensor:
    """Absolute positions of the held-out queries of chunk ``start .. end - 1``: every row before its last
    ``last_q``, or ``rows`` of them evenly spaced (``rows`` <= 0: all)."""
    stop = end - last_q
    if stop <= start:
        raise ValueError(f"chunk {start}..{end - 1} has no rows before its last {last_q}")
    if rows <= 0 or rows >= stop - start:
        return torch.arange(start, stop)
    return torch.linspace(start, stop - 1, rows).round().long().unique()


def recall_density(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, scale: float,
                   patterns: list[PatternBatch]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pattern (one request row each): recall and density of its KV heads over the queries at ``pos``.

    Args:
        q: ``[H, len(pos), D]`` the queries at ``pos``; k: ``[Hkv, S, D]`` keys from position 0 (``S > pos``).
    Returns:
        ``(recall [P, Hkv], density [P, Hkv])`` fp32.
    """
    num_kv = k.shape[0]
    group = q.shape[0] // num_kv
    rec = torch.zeros(len(patterns), num_kv)
    pairs = torch.zeros(len(patterns), num_kv)
    for i in range(0, len(pos), ROW_BATCH):
        p = pos[i:i + ROW_BATCH]
        seq = int(p.max()) + 1
        probs = group_sum(attention_probs(q[:, i:i + ROW_BATCH], k[:, :seq], p, scale), num_kv) / group
        for j, pb in enumerate(patterns):
            allowed = allowed_mask(pb, 0, p, seq)
            rec[j] += (probs * allowed).sum((1, 2))
            pairs[j] += allowed.sum((1, 2))
    return rec / len(pos), pairs / float((pos + 1).sum())


def evaluate_chunk(q: torch.Tensor, k: torch.Tensor, start: int, end: int, scale: float,
                   variants: list[Variant], rows: int = 0, last_q: int = 64,
                   static_density: float | None = None, check: bool = False) -> dict[str, HeadResult]:
    """Estimate each variant's patterns for the chunk ``start .. end - 1`` and measure them held out.

    Args:
        q: ``[H, L, D]`` post-RoPE queries of the prompt (``L >= end``); k: ``[Hkv, L, D]`` its keys.
        static_density: also measure one sink + window pattern for every head (sink = the estimator's),
            the longest window at this density (key ``STATIC``).
        check: compare ``allowed_mask`` with ``pattern_mask`` on ``CHECK_ROWS`` rows of every pattern (its
            loop over slots costs about 0.7 s a pattern at 7k keys); a difference raises ``RuntimeError``.
    Returns:
        variant name (and ``STATIC``) -> per-head results.
    """
    pos = held_out_rows(start, end, last_q, rows)
    names, patterns, programs, est = [], [], [], []
    for v in variants:
        cfg = EstimatorConfig(last_q=last_q, threshold=v.threshold)
        e = estimate_patterns(q[:, end - last_q:end], k[:, :end], start, scale, cfg,
                              q_chunk=q[:, start:end] if v.block else None)
        names.append(v.name)
        patterns.append(e.patterns)
        programs.append([PROGRAMS[int(x)] for x in e.program])
        est.append(e.recall.tolist())
    if static_density is not None:
        sink = EstimatorConfig().sink
        window = static_window(pos, sink, static_density)
        names.append(STATIC)
        patterns.append(PatternBatch.local(1, k.shape[0], sink, window))
        programs.append([f"a-shape {sink}+{window}"] * k.shape[0])
        est.append([float("nan")] * k.shape[0])
    if check:
        rows_checked = pos[torch.linspace(0, len(pos) - 1, min(CHECK_ROWS, len(pos))).round().long()]
        for name, pb in zip(names, patterns):
            if not torch.equal(allowed_mask(pb, 0, rows_checked, end), pattern_mask(pb, 0, rows_checked, end)):
                raise RuntimeError(f"allowed_mask differs from pattern_mask ({name}, chunk {start}..{end - 1})")
    rec, den = recall_density(q[:, pos], k[:, :end], pos, scale, patterns)
    return {name: HeadResult(prog, rec[j].tolist(), den[j].tolist(), est[j])
            for j, (name, prog) in enumerate(zip(names, programs))}
