"""CASAK-V attention patterns: one definition, used by every kernel and policy.

A pattern says which cached KV positions a query may attend to.  Patterns are
given per request and per **KV head** (the query heads of a GQA group share
their KV head's pattern, so each KV tile is loaded once for the whole group).

For request ``r``, KV head ``h``, a query at absolute position ``q`` and a KV
position ``k`` (both 0-based, ``k <= q`` always required: causal)::

    allowed(q, k) = k <= q and (
           k == q                                       # the diagonal: no row is empty
        or full[r, h]
        or k < sink[r, h]                               # attention sinks
        or q - k < window[r, h]                         # local window ("A-shape" with sinks)
        or (q - k) in slash[r, h, :]                    # slash lines (diagonals)
        or k in vertical[r, h, :]                       # vertical stripes (columns)
        or blocks[r, h, q // block, k // block]         # block-sparse
    )

Window semantics: ``window = w`` lets a query see itself and the ``w - 1``
positions before it (``q - k < w``), so ``w = 1`` is the diagonal only; this
is vLLM's ``|q - k| < w`` restricted to the causal half.  Hybrids
("vertical-slash", "sink + window + blocks", ...) are just several fields set
at once.  Unused slots of ``slash``/``vertical`` hold -1.

:class:`PatternBatch` holds these fields as tensors on the kernels' device;
``pattern_mask`` is the dense torch reference of ``allowed``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class PatternBatch:
    """Patterns for ``R`` requests x ``H`` KV heads.

    Attributes (all int32 unless noted, on one device):
        full: ``[R, H]`` bool; dense causal head.
        sink: ``[R, H]``; leading KV tokens always visible.
        window: ``[R, H]``; local window length (0 = none).
        slash: ``[R, H, S]``; diagonal offsets ``q - k`` (>= 0), -1 = unused.
        vertical: ``[R, H, V]``; KV column indices, -1 = unused.
        blocks: ``[R, H, NQB, NKB]`` bool or None; block-sparse mask at
            ``block`` x ``block`` granularity in absolute positions.
        block: block edge (tokens) of ``blocks``.
        sparse_only: host-side promise that no head is ``full`` (the
            tensors live on the device, so the host cannot look).  It lets
            the prefill kernel plan tiles for sparse heads only (see
            ``sparse_prefill.WIDE_TILES``).  A wrong promise costs speed,
            never correctness: full heads are still computed exactly.
    """

    full: torch.Tensor
    sink: torch.Tensor
    window: torch.Tensor
    slash: torch.Tensor
    vertical: torch.Tensor
    blocks: torch.Tensor | None = None
    block: int = 64
    sparse_only: bool = False

    @property
    def num_requests(self) -> int:
        return self.full.shape[0]

    @property
    def num_heads(self) -> int:
        return self.full.shape[1]

    def to(self, device) -> "PatternBatch":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    @classmethod
    def empty(cls, num_requests: int, num_heads: int, num_slash: int = 1, num_vertical: int = 1,
              device="cpu") -> "PatternBatch":
        """Patterns where every head sees only the diagonal; set fields to widen them."""
        z = torch.zeros(num_requests, num_heads, dtype=torch.int32, device=device)
        return cls(
            full=torch.zeros(num_requests, num_heads, dtype=torch.bool, device=device),
            sink=z.clone(), window=z.clone(),
            slash=torch.full((num_requests, num_heads, num_slash), -1, dtype=torch.int32, device=device),
            vertical=torch.full((num_requests, num_heads, num_vertical), -1, dtype=torch.int32, device=device),
        )

    @classmethod
    def dense(cls, num_requests: int, num_heads: int, device="cpu") -> "PatternBatch":
        p = cls.empty(num_requests, num_heads, device=device)
        p.full.fill_(True)
        return p

    @classmethod
    def assemble(cls, parts: list[tuple[list[int], "PatternBatch | None"]], num_requests: int,
                 num_heads: int, device="cpu") -> "PatternBatch":
        """One batch from parts: ``(rows, patterns)`` puts ``patterns`` row ``j`` at batch row
        ``rows[j]``; ``patterns=None`` makes those rows dense.  Every row must be covered once.
        Slash / vertical lists are padded with -1 to the widest part; pattern blocks must share
        one edge (``block``)."""
        present = [p for _, p in parts if p is not None]
        n_slash = max([p.slash.shape[-1] for p in present], default=1)
        n_vert = max([p.vertical.shape[-1] for p in present], default=1)
        out = cls.empty(num_requests, num_heads, n_slash, n_vert, device=device)
        with_blocks = [p for p in present if p.blocks is not None]
        if with_blocks:
            edges = {int(p.block) for p in with_blocks}
            if len(edges) != 1:
                raise ValueError(f"pattern blocks of one batch must share one edge, got {sorted(edges)}")
            out.block = edges.pop()
            nqb = max(p.blocks.shape[2] for p in with_blocks)
            nkb = max(p.blocks.shape[3] for p in with_blocks)
            out.blocks = torch.zeros(num_requests, num_heads, nqb, nkb, dtype=torch.bool, device=device)
        covered = 0
        for rows, p in parts:
            idx = torch.tensor(rows, dtype=torch.long, device=device)
            covered += len(rows)
            if p is None:
                out.full[idx] = True
                continue
            out.full[idx] = p.full.to(device)
            out.sink[idx] = p.sink.to(device)
            out.window[idx] = p.window.to(device)
            out.slash[idx, :, :p.slash.shape[-1]] = p.slash.to(device)
            out.vertical[idx, :, :p.vertical.shape[-1]] = p.vertical.to(device)
            if p.blocks is not None:
                out.blocks[idx, :, :p.blocks.shape[2], :p.blocks.shape[3]] = p.blocks.to(device)
        if covered != num_requests:
            raise ValueError(f"parts cover {covered} rows of {num_requests}")
        out.sparse_only = all(p is not None and p.sparse_only for _, p in parts)
        return out

    @classmethod
    def local(cls, num_requests: int, num_heads: int, sink: int, window: int, device="cpu") -> "PatternBatch":
        """StreamingLLM / A-shape: ``sink`` first tokens plus a ``window`` of recent ones."""
        p = cls.empty(num_requests, num_heads, device=device)
        p.sink.fill_(sink)
        p.window.fill_(window)
        p.sparse_only = True
        return p


def pattern_mask(p: PatternBatch, r: int, q_pos: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Dense reference of ``allowed`` for request ``r``.

    Args:
        q_pos: ``[Q]`` absolute query positions.
        seq_len: KV positions ``0 .. seq_len - 1`` are considered.

    Returns:
        ``[H, Q, seq_len]`` bool.
    """
    device = p.full.device
    q = q_pos.to(device).long()[None, :, None]  # [1, Q, 1]
    k = torch.arange(seq_len, device=device)[None, None, :]  # [1, 1, S]
    dist = q - k
    h = p.num_heads
    allowed = (dist == 0).expand(h, q.shape[1], seq_len).clone()
    allowed |= p.full[r].view(h, 1, 1)
    allowed |= k < p.sink[r].long().view(h, 1, 1)
    allowed |= dist < p.window[r].long().view(h, 1, 1)
    for s in range(p.slash.shape[-1]):
        off = p.slash[r, :, s].long().view(h, 1, 1)
        allowed |= (off >= 0) & (dist == off)
    for v in range(p.vertical.shape[-1]):
        col = p.vertical[r, :, v].long().view(h, 1, 1)
        allowed |= (col >= 0) & (k == col)
    if p.blocks is not None:
        qb = (q // p.block).clamp(max=p.blocks.shape[2] - 1)
        kb = (k // p.block).clamp(max=p.blocks.shape[3] - 1)
        allowed |= p.blocks[r][:, qb.squeeze(-1).squeeze(0)][:, :, kb.squeeze(0).squeeze(0)]
    return allowed & (dist >= 0)
