"""The online pattern estimator: a prefill chunk's own attention picks each KV head's pattern.

For one request and one layer: the attention of the chunk's last queries
(``EstimatorConfig.last_q``) over every key so far, averaged over the query
heads of each KV head, is the evidence.  For each head, every program below is
fitted to the smallest size whose attention *recall* (the share of that
attention mass it allows) reaches ``threshold``; the head gets the program of
least *density* (the share of the chunk's causal (query, key) pairs it allows)
among those, ``full`` when none does:

- ``a-shape``: ``sink`` first tokens plus the shortest window of ``windows``;
- ``vertical``: the fewest columns (most attended first), at most ``max_vertical``;
- ``slash``: the fewest diagonals ``q - k``, at most ``max_slash``;
- ``vertical-slash``: columns and diagonals together, from a grid of budgets;
- ``block``: per block of ``block`` queries of the chunk, the fewest key blocks
  holding ``threshold`` of the attention of its mean query (MInference's
  pooled estimate), recall checked on the observed rows;
- ``full``: everything (recall 1, density 1).

Everything stays on the device: per-head choices are tensors, list lengths are
capped host ints, nothing is read back.  The result is a
:class:`~casakv_kernels.patterns.PatternBatch` of one row (the one pattern
definition every kernel reads) plus what the choice rests on, so the pattern
scheduler applies it and the predictor can learn from it (its training
labels).  Positions are absolute: the chunk's queries are at
``context .. seq_len - 1``, the keys at ``0 .. seq_len - 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from casakv_kernels.patterns import PatternBatch

PROGRAMS = ("full", "a-shape", "vertical", "slash", "vertical-slash", "block")
FULL, ASHAPE, VERTICAL, SLASH, VSLASH, BLOCK = range(len(PROGRAMS))


@dataclass(frozen=True)
class EstimatorConfig:
    last_q: int = 64  # the chunk's last queries whose attention is the evidence
    threshold: float = 0.95  # attention recall a pattern must reach
    sink: int = 64
    windows: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
    max_vertical: int = 1024
    max_slash: int = 256
    vslash: tuple[tuple[int, int], ...] = ((32, 32), (64, 64), (128, 64), (256, 128), (512, 128), (1024, 256))
    block: int = 64


@dataclass
class Estimate:
    """One request's patterns at one layer, and what they rest on (all ``[Hkv]``, on the device)."""

    patterns: PatternBatch  # one row
    program: torch.Tensor  # long, index into PROGRAMS
    recall: torch.Tensor  # fp32, on the observed rows
    density: torch.Tensor  # fp32, of the chunk's causal area


def _group_mean_probs(q: torch.Tensor, k: torch.Tensor, qpos: torch.Tensor, scale: float,
                      present: torch.Tensor | None = None) -> torch.Tensor:
    """``[Hkv, n, S]`` causal softmax of ``q`` ``[H, n, D]`` over ``k`` ``[Hkv, S, D]``, averaged per group
    (``present`` ``[Hkv, S]``: only those keys)."""
    num_heads, n, d = q.shape
    num_kv, seq, _ = k.shape
    group = num_heads // num_kv
    logits = torch.matmul(q.float().reshape(num_kv, group * n, d), k.float().transpose(1, 2)) * scale
    logits = logits.view(num_kv, group, n, seq)
    visible = (torch.arange(seq, device=q.device).view(1, seq) <= qpos.view(n, 1)).view(1, 1, n, seq)
    if present is not None:
        visible = visible & present.view(num_kv, 1, 1, seq)
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
    return probs.mean(1)


def _causal_area(context: int, seq_len: int) -> float:
    """(query, key) pairs of causal attention for queries ``context .. seq_len - 1``."""
    return float((seq_len * (seq_len + 1) - context * (context + 1)) // 2)


def _sum_min(lo: int, hi: int, cap: int) -> int:
    """``sum(min(x, cap) for x in range(lo, hi + 1))`` in closed form (host ints, no loop)."""
    if hi < lo:
        return 0
    top = min(hi, cap)
    below = (top * (top + 1) - (lo - 1) * lo) // 2 if top >= lo else 0
    return below + cap * (hi - max(top, lo - 1))


def _ranked_on(fit: torch.Tensor, checks: tuple[torch.Tensor, ...], threshold: float,
               cap: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Like ``_ranked``: the order from ``fit`` ``[Hkv, L]``; the count the first that every mass of ``checks``
    needs along it to reach ``threshold``; the mass the first check holds there."""
    order = torch.sort(fit, dim=1, descending=True, stable=True).indices
    cums = [c.gather(1, order).cumsum(1) for c in checks]
    count = torch.stack([(cum < threshold).sum(1) + 1 for cum in cums]).amax(0).clamp_max(min(cap, fit.shape[1]))
    return order, count, cums[0].gather(1, (count - 1).unsqueeze(1)).squeeze(1)


def _rank_of(order: torch.Tensor) -> torch.Tensor:
    """Inverse of ``order`` ``[Hkv, L]``: each position's rank."""
    ranks = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, ranks)


def _first(idx: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``idx`` ``[Hkv, cap]`` with entries past each row's ``count`` set to -1 (int32)."""
    keep = torch.arange(idx.shape[1], device=idx.device).unsqueeze(0) < count.unsqueeze(1)
    return torch.where(keep, idx, -1).to(torch.int32)


def estimate_patterns(q: torch.Tensor, k: torch.Tensor, context: int, scale: float,
                      cfg: EstimatorConfig = EstimatorConfig(), q_chunk: torch.Tensor | None = None,
                      present: torch.Tensor | None = None) -> Estimate:
    """Patterns of one request's KV heads for the prefill chunk of queries ``context .. seq_len - 1``.

    Args:
        q: ``[H, n, D]`` the chunk's last ``n`` queries (positions ``seq_len - n .. seq_len - 1``).
        k: ``[Hkv, seq_len, D]`` every key so far (post-RoPE, like the queries).
        q_chunk: ``[H, seq_len - context, D]`` all the chunk's queries, for the block-sparse program
            (None: no block program).
        present: ``[Hkv, seq_len]`` bool, the keys the cache still holds (a compressed cache: the evidence
            is the attention over those; the patterns still speak of positions).  None: every key.
    """
    num_kv, seq, _ = k.shape
    n = q.shape[1]
    device = q.device
    qpos = torch.arange(seq - n, seq, device=device)
    probs = _group_mean_probs(q, k, qpos, scale, present)  # [Hkv, n, S]
    area = _causal_area(context, seq)
    rows = seq - context
    tau = cfg.threshold
    recall = torch.zeros(num_kv, len(PROGRAMS), device=device)
    density = torch.full((num_kv, len(PROGRAMS)), float("inf"), device=device)
    recall[:, FULL], density[:, FULL] = 1.0, 1.0

    # a-shape: sink + the shortest window that reaches tau
    sink = min(cfg.sink, seq)
    prefix = probs[..., :sink].sum(-1)  # [Hkv, n]
    suffix = probs.flip(-1).cumsum(-1).flip(-1)  # suffix[..., j] = mass of keys >= j
    windows = [w for w in cfg.windows if w < seq] or [seq]
    starts = torch.stack([(qpos - w + 1).clamp_min(sink) for w in windows], 1)  # [n, W]
    in_window = suffix.gather(2, starts.clamp_max(seq - 1).unsqueeze(0).expand(num_kv, n, len(windows)))
    in_window = in_window * (starts <= qpos.unsqueeze(1)).unsqueeze(0)
    rec_w = (prefix.unsqueeze(-1) + in_window).mean(1)  # [Hkv, W]
    den_w = torch.tensor([_sum_min(context + 1, seq, sink + w) / area for w in windows],
                         device=device)
    ok = rec_w >= tau
    pick = torch.where(ok.any(1), ok.float().argmax(1), len(windows) - 1)
    window = torch.tensor(windows, device=device)[pick]
    recall[:, ASHAPE] = rec_w.gather(1, pick.unsqueeze(1)).squeeze(1)
    density[:, ASHAPE] = den_w[pick]

    # Columns and diagonals are ranked on the earlier half of the observed rows, and must reach tau on the
    # later half as well as on all of them: keys attended for being near the observed queries (a local
    # head's) and the diagonals of a few columns rank high on one half but do not carry over to other
    # queries, which a pattern must.
    half = max(1, n // 2)
    dist = (qpos.view(n, 1) - torch.arange(seq, device=device).view(1, seq)).clamp_min(0)  # [n, S]
    fit, check = probs[:, :half], probs[:, half:] if n > 1 else probs

    # vertical stripes: the most attended columns (plus the diagonal, always allowed)
    col_order, v_count, v_rec = _ranked_on(fit.mean(1), (probs.mean(1), check.mean(1)), tau, cfg.max_vertical)
    recall[:, VERTICAL] = v_rec
    density[:, VERTICAL] = (v_count + 1).float() * rows / area

    # slash lines: the most attended diagonals d = q - k
    def by_dist(part, lo):
        return torch.zeros(num_kv, seq, device=device).index_add_(
            1, dist[lo:lo + part.shape[1]].flatten(), part.reshape(num_kv, -1)) / part.shape[1]

    dist_order, s_count, s_rec = _ranked_on(by_dist(fit, 0), (by_dist(probs, 0), by_dist(check, n - check.shape[1])),
                                            tau, cfg.max_slash)
    recall[:, SLASH] = s_rec
    density[:, SLASH] = s_count.float() * rows / area

    # vertical-slash: the cheapest budget pair of the grid whose union reaches tau on the checked rows
    grid = [(nv, ns) for nv, ns in cfg.vslash if nv <= min(cfg.max_vertical, seq) and ns <= min(cfg.max_slash, seq)]
    grid = grid or [(min(cfg.max_vertical, seq), min(cfg.max_slash, seq))]
    vs_rec = torch.zeros(num_kv, len(grid), device=device)
    vs_checked = torch.zeros(num_kv, len(grid), device=device)
    vs_den = []
    # its columns are ranked without each row's nearest keys, which its diagonals cover
    far = dist[:half] >= min(cfg.vslash[0][1], seq)
    cols_rank = _rank_of(torch.sort((fit * far).mean(1), dim=1, descending=True, stable=True).indices)
    diag_rank = _rank_of(dist_order).gather(1, dist.flatten().expand(num_kv, -1)).view(num_kv, n, seq)
    for j, (nv, ns) in enumerate(grid):
        held = (probs * ((cols_rank < nv).unsqueeze(1) | (diag_rank < ns))).sum(-1)  # [Hkv, n]
        vs_rec[:, j], vs_checked[:, j] = held.mean(1), held[:, n - check.shape[1]:].mean(1)
        vs_den.append(min(1.0, (nv + ns) * rows / area))
    ok = (vs_rec >= tau) & (vs_checked >= tau)
    vs_best = torch.where(ok.any(1), ok.float().argmax(1), len(grid) - 1)
    recall[:, VSLASH] = vs_rec.gather(1, vs_best.unsqueeze(1)).squeeze(1)
    density[:, VSLASH] = torch.tensor(vs_den, device=device)[vs_best]
    vs_nv = torch.tensor([v for v, _ in grid], device=device)[vs_best]
    vs_ns = torch.tensor([s for _, s in grid], device=device)[vs_best]

    blocks = None
    if q_chunk is not None:
        blocks, b_rec, b_den = _block_program(q_chunk, k, probs, qpos, context, scale, cfg)
        recall[:, BLOCK], density[:, BLOCK] = b_rec, b_den

    feasible = (recall >= tau) | (torch.arange(len(PROGRAMS), device=device) == FULL)
    program = torch.where(feasible, density, float("inf")).argmin(1)
    chosen = lambda p: program == p  # noqa: E731

    pb = PatternBatch.empty(1, num_kv, num_slash=min(cfg.max_slash, seq), num_vertical=min(cfg.max_vertical, seq),
                            device=device)
    pb.full[0] = chosen(FULL)
    pb.sink[0] = torch.where(chosen(ASHAPE), sink, 0).to(torch.int32)
    pb.window[0] = torch.where(chosen(ASHAPE), window, 0).to(torch.int32)
    vert = torch.where(chosen(VERTICAL), v_count, torch.where(chosen(VSLASH), vs_nv, 0))
    pb.vertical[0] = _first(col_order[:, :pb.vertical.shape[-1]], vert)
    slash = torch.where(chosen(SLASH), s_count, torch.where(chosen(VSLASH), vs_ns, 0))
    pb.slash[0] = _first(dist_order[:, :pb.slash.shape[-1]], slash)
    if blocks is not None:
        pb.blocks = (blocks & chosen(BLOCK).view(num_kv, 1, 1)).unsqueeze(0)
        pb.block = cfg.block
    return Estimate(pb, program, recall.gather(1, program.unsqueeze(1)).squeeze(1),
                    density.gather(1, program.unsqueeze(1)).squeeze(1))


def _block_program(q_chunk, k, probs, qpos, context: int, scale: float, cfg: EstimatorConfig):
    """Block-sparse: ``(blocks [Hkv, NQB, NKB] bool over absolute positions, recall [Hkv], density [Hkv])``."""
    num_kv, seq, d = k.shape
    b = cfg.block
    nkb = -(-seq // b)
    first_qb, nqb = context // b, -(-seq // b)
    num_heads = q_chunk.shape[0]
    group = num_heads // num_kv
    qpad = torch.zeros(num_heads, nqb * b, d, device=k.device, dtype=torch.float32)
    qpad[:, context:seq] = q_chunk.float()
    counts = torch.zeros(nqb * b, device=k.device)
    counts[context:seq] = 1
    qbar = qpad.view(num_heads, nqb, b, d).sum(2) / counts.view(nqb, b).sum(1).clamp_min(1).view(1, nqb, 1)
    kpad = torch.zeros(num_kv, nkb * b, d, device=k.device, dtype=torch.float32)
    kpad[:, :seq] = k.float()
    kbar = kpad.view(num_kv, nkb, b, d).sum(2) / torch.bincount(torch.arange(seq, device=k.device) // b,
                                                              minlength=nkb).clamp_min(1).view(1, nkb, 1)
    logits = torch.matmul(qbar.view(num_kv, group * nqb, d), kbar.transpose(1, 2)).view(num_kv, group, nqb, nkb)
    causal = torch.arange(nkb, device=k.device).view(1, nkb) <= torch.arange(nqb, device=k.device).view(nqb, 1)
    mass = torch.softmax((logits * scale).masked_fill(~causal, float("-inf")), -1).mean(1)  # [Hkv, NQB, NKB]
    top, idx = torch.sort(mass, -1, descending=True)
    keep_sorted = (top.cumsum(-1) - top) < cfg.threshold  # every block up to the one crossing tau
    keep_sorted[..., 0] = True
    blocks = torch.zeros_like(mass, dtype=torch.bool).scatter_(-1, idx, keep_sorted) & causal
    blocks[:, :first_qb] = False  # query blocks before the chunk are not computed now
    diag = torch.arange(nqb, device=k.device)
    blocks[:, diag, diag.clamp_max(nkb - 1)] = True  # a block's own keys (the causal diagonal)
    # recall on the observed rows: the key blocks their query block keeps
    rows_qb = qpos // b
    allowed = blocks[:, rows_qb].repeat_interleave(b, dim=-1)[..., :seq]  # [Hkv, n, S]
    recall = (probs * allowed).sum(-1).mean(1)
    per_block = torch.tensor([min(b, seq - kb * b) for kb in range(nkb)], device=k.device, dtype=torch.float32)
    rows_per_qb = counts.view(nqb, b).sum(1)  # chunk rows in each query block
    area = (blocks.float() * per_block.view(1, 1, nkb) * rows_per_qb.view(1, nqb, 1)).sum((1, 2))
    return blocks, recall, (area / _causal_area(context, seq)).clamp_max(1.0)
