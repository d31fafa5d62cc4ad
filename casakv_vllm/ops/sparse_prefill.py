"""Block-sparse prefill attention in torch (the CPU build): a chunk's queries attend only to the keys their
KV head's pattern allows, and only those are computed.

For one request (row ``r`` of a :class:`~casakv_kernels.patterns.PatternBatch`) and each KV head, the
pattern's keys are taken in up to three parts, each a dense product over the keys it gathers:

- **local**: per tile of ``TILE`` queries, the sinks and the window range the tile's queries reach
  (``sink + window + TILE - 1`` keys, however long the sequence);
- **columns**: the vertical stripes, once for every query (those inside a query's sinks or window are
  left to the local part);
- **diagonals**: per query, the key on each slash line (and the diagonal itself when the head has no
  window), less what the other parts hold.

Each (query, key) pair is counted by exactly one part, and the parts are merged as one softmax (a shared
maximum and denominator), so the result equals masked dense attention under ``pattern_mask``; the work is
what the pattern allows plus each tile's window edge.  ``full`` heads are computed densely, heads with
block-sparse fields by ``ops.block_sparse`` (the key blocks they touch).  Math in fp32.
"""

from __future__ import annotations

import torch

from casakv_kernels.patterns import PatternBatch
from casakv_vllm.ops.block_sparse import pattern_attention
from casakv_vllm.ops.torch_attention import attend

#: queries per tile of the local part
TILE = 64


class _Part:
    """Logits over the keys one part gathers, in the part's own layout ``lead + [m]``; how that layout maps
    to ``[g, n]`` and back (``view``, ``unview``), and how its probabilities meet its values (``apply``)."""

    def __init__(self, logits: torch.Tensor, view, unview, apply) -> None:
        self.logits, self.view, self.unview, self.apply = logits, view, unview, apply

    def top(self) -> torch.Tensor:
        return self.view(self.logits.amax(-1))

    def merge(self, top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(denominator [g, n], numerator [g, n, D])`` against the shared maximum ``top`` ``[g, n]``."""
        e = self.logits.sub_(self.unview(top).unsqueeze(-1)).exp_()
        return self.view(e.sum(-1)), self.apply(e)


def _local(qh, kh, vh, qpos, sink: int, window: int, scale: float) -> _Part:
    """Sinks + window, per tile of ``TILE`` queries: logits ``[tiles, g * TILE, W]``."""
    g, n, d = qh.shape
    seq = kh.shape[0]
    tiles = -(-n // TILE)
    width = window + TILE - 1 if window > 0 else 0
    first = int(qpos[0])
    tile_q = first + torch.arange(tiles).unsqueeze(1) * TILE + torch.arange(TILE).unsqueeze(0)  # [T, TILE]
    lo = first + torch.arange(tiles) * TILE - window + 1  # each tile's earliest window key
    keys = torch.cat([torch.arange(sink).expand(tiles, sink), lo.unsqueeze(1) + torch.arange(width)], 1)  # [T, W]
    in_sink = (torch.arange(keys.shape[1]) < sink).view(1, 1, -1)
    kq, qq = keys.unsqueeze(1), tile_q.unsqueeze(2)
    valid = torch.where(in_sink, kq <= qq, (kq >= sink) & (kq > qq - window) & (kq <= qq))  # [T, TILE, W]
    idx = keys.clamp(0, seq - 1)
    kg, vg = kh[idx].float(), vh[idx].float()  # [T, W, D]
    qt = torch.nn.functional.pad(qh, (0, 0, 0, tiles * TILE - n)).view(g, tiles, TILE, d).transpose(0, 1)
    logits = torch.bmm(qt.reshape(tiles, g * TILE, d), kg.transpose(1, 2)).mul_(scale)  # [T, g * TILE, W]
    logits.view(tiles, g, TILE, -1).masked_fill_(~valid.unsqueeze(1), float("-inf"))

    def view(x):  # [T, g * TILE] -> [g, n]
        return x.view(tiles, g, TILE).transpose(0, 1).reshape(g, tiles * TILE)[:, :n]

    def unview(x):  # [g, n] -> [T, g * TILE]
        pad = torch.nn.functional.pad(x, (0, tiles * TILE - n))
        return pad.view(g, tiles, TILE).transpose(0, 1).reshape(tiles, g * TILE)

    def apply(e):
        o = torch.bmm(e, vg).view(tiles, g, TILE, d).transpose(0, 1).reshape(g, tiles * TILE, d)
        return o[:, :n]

    return _Part(logits, view, unview, apply)


def sparse_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context_len: int, scale: float,
                  patterns: PatternBatch, r: int = 0) -> tuple[torch.Tensor, int]:
    """Causal attention of queries ``context_len .. seq_len - 1`` under row ``r`` of ``patterns``.

    Args:
        q: ``[H, n, D]``; k, v: ``[Hkv, seq_len, D]`` (``seq_len = context_len + n``), on the CPU.
    Returns:
        ``(out [H, n, D] fp32, (query, key) pairs computed, summed over KV heads)``.
    """
    num_heads, n, dim = q.shape
    num_kv, seq, _ = k.shape
    g = num_heads // num_kv
    p = patterns.to("cpu")
    out = torch.empty(num_heads, n, dim, dtype=torch.float32)
    qpos = torch.arange(context_len, seq)
    full, sinks, windows = p.full[r].tolist(), p.sink[r].tolist(), p.window[r].tolist()
    pairs = 0
    for h in range(num_kv):
        heads = slice(h * g, (h + 1) * g)
        qh, kh, vh = q[heads].float(), k[h], v[h]  # keys and values convert to fp32 once gathered
        sink, window = min(sinks[h], seq), min(windows[h], seq)
        if p.blocks is not None and bool(p.blocks[r, h].any()):  # block-sparse: the key blocks it touches
            out[heads], computed = pattern_attention(qh, kh.unsqueeze(0), vh.unsqueeze(0), context_len, scale,
                                                     _one_head(p, r, h), block=p.block)
            pairs += computed
            continue
        if full[h] or sink + window >= seq:
            out[heads] = attend(qh, kh.unsqueeze(0), vh.unsqueeze(0), context_len, scale)
            pairs += n * context_len + n * (n + 1) // 2
            continue
        out[heads], computed = _sparse_head(qh, kh, vh, qpos, sink, window, p.vertical[r, h], p.slash[r, h], scale)
        pairs += computed
    return out, pairs


def _one_head(p: PatternBatch, r: int, h: int) -> PatternBatch:
    """Row ``r``, KV head ``h`` of ``p`` as a one-request, one-head batch."""
    pick = lambda x: x[r:r + 1, h:h + 1]  # noqa: E731
    return PatternBatch(pick(p.full), pick(p.sink), pick(p.window), pick(p.slash), pick(p.vertical),
                        pick(p.blocks) if p.blocks is not None else None, p.block)


def _sparse_head(qh, kh, vh, qpos, sink: int, window: int, vertical, slash, scale: float):
    """One KV head's ``(out [g, n, D], pairs computed)`` from its local, column and diagonal parts."""
    g, n, d = qh.shape
    seq = kh.shape[0]
    same = lambda x: x  # noqa: E731  (a part laid out as [g, n, m])
    parts: list[_Part] = []
    if sink or window:
        parts.append(_local(qh, kh, vh, qpos, sink, window, scale))
    cols = vertical[vertical >= 0].long().unique()
    cols = cols[cols < seq]
    if cols.numel():
        qq = qpos.unsqueeze(1)
        valid = (cols <= qq) & (cols >= sink) & (cols <= qq - window)  # not in the local part
        logits = torch.matmul(qh, kh[cols].float().t()).mul_(scale).masked_fill_(~valid, float("-inf"))  # [g, n, C]
        parts.append(_Part(logits, same, same, lambda e, vc=vh[cols].float(): e @ vc))
    offs = slash[slash >= 0].long()
    offs = torch.cat([offs, torch.zeros(1, dtype=torch.long)]) if window == 0 else offs
    offs = offs[offs >= window].unique()  # a line inside the window is the local part's
    if offs.numel():
        key = qpos.unsqueeze(1) - offs  # [n, O]
        column = torch.zeros(seq + 1, dtype=torch.bool)
        column[cols] = True
        valid = (key >= sink) & ~column[key.clamp(0, seq)]
        idx = key.clamp(0, seq - 1)
        kd, vd = kh[idx].float(), vh[idx].float()  # [n, O, D]
        logits = torch.bmm(qh.transpose(0, 1), kd.transpose(1, 2)).mul_(scale)  # [n, g, O]
        logits.masked_fill_(~valid.unsqueeze(1), float("-inf"))
        flip = lambda x: x.t()  # noqa: E731  ([n, g] <-> [g, n])
        parts.append(_Part(logits, flip, flip, lambda e, vd=vd: torch.bmm(e, vd).transpose(0, 1)))
    top = torch.stack([p.top() for p in parts]).amax(0)  # [g, n]
    den = torch.zeros(g, n)
    num = torch.zeros(g, n, d)
    for p in parts:
        pden, pnum = p.merge(top)
        den += pden
        num += pnum
    return num / den.unsqueeze(-1), sum(n * p.logits.shape[-1] for p in parts)
