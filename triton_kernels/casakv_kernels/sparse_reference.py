"""Plain-torch fp32 reference of pattern-restricted paged attention.

Tests and debugging only: a Python loop over requests, the dense
:func:`.patterns.pattern_mask` and fp32 math.
"""

from __future__ import annotations

import torch

from .patterns import PatternBatch, pattern_mask
from .reference import masked_paged_attention_ref


def sparse_paged_attention_ref(
    query: torch.Tensor,  # [num_tokens, num_heads, head_size]
    kv_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, 2*head_size]
    block_table: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    scale: float,
    patterns: PatternBatch,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query row over the KV positions ``allowed`` by its
    request's pattern for its KV head (query head ``h`` uses KV head
    ``h // group``).

    Returns ``(out, lse)``: fp32 ``[num_tokens, num_heads, head_size]`` and
    natural-log log-sum-exp of the scaled allowed scores, fp32
    ``[num_tokens, num_heads]``; rows past ``query_start_loc[-1]`` are 0 /
    ``-inf``.
    """
    num_heads, num_kv_heads = query.shape[1], kv_cache.shape[1]
    assert num_heads % num_kv_heads == 0
    assert patterns.num_heads == num_kv_heads
    group = num_heads // num_kv_heads

    def allowed(i: int, q_pos: torch.Tensor, seq_len: int) -> torch.Tensor:
        mask = pattern_mask(patterns, i, q_pos, seq_len).to(query.device)  # [kvh, q, k]
        return mask.repeat_interleave(group, dim=0)  # [num_heads, q, k]

    return masked_paged_attention_ref(query, kv_cache, block_table, query_start_loc, seq_lens, scale, allowed)


PATTERN_KINDS = ("full", "diag", "sink_window", "slash", "vertical", "blocks",
                 "vertical_slash", "hybrid")


def random_patterns(rng, seq_lens: list[int], num_kv_heads: int,
                    kinds=PATTERN_KINDS, num_slash: int | None = None,
                    num_vertical: int | None = None,
                    block: int | None = None) -> PatternBatch:
    """Random patterns for tests: per (request, kv head) one of ``kinds``
    (``rng`` is a :class:`random.Random`).

    Lists mix -1 (unused), duplicates and entries past the sequence; windows
    include 0 and 1; the block grid is sometimes one block short or long
    (``pattern_mask`` clamps indices to it).
    """
    num_seqs = len(seq_lens)
    max_seq = max(seq_lens)
    num_slash = num_slash if num_slash is not None else rng.randint(1, 6)
    num_vertical = num_vertical if num_vertical is not None else rng.randint(1, 6)
    p = PatternBatch.empty(num_seqs, num_kv_heads, num_slash, num_vertical)
    block = block if block is not None else rng.choice([4, 8, 16, 32, 64])
    nb = max(1, -(-max_seq // block) + rng.choice([-1, 0, 0, 1]))
    blocks = torch.zeros(num_seqs, num_kv_heads, nb, nb, dtype=torch.bool)
    use_blocks = False

    def entries(n, seq_len, density):
        vals = []
        for _ in range(n):
            if rng.random() < density:
                vals.append(rng.randrange(0, seq_len + 4))
            else:
                vals.append(-1)
        if n > 1 and rng.random() < 0.3:
            vals[-1] = vals[0]  # duplicate
        return vals

    for r, seq_len in enumerate(seq_lens):
        for h in range(num_kv_heads):
            kind = rng.choice(kinds)
            if kind == "full":
                p.full[r, h] = True
            if kind in ("sink_window", "hybrid"):
                p.sink[r, h] = rng.choice([0, 1, 4, rng.randrange(0, seq_len + 1)])
                p.window[r, h] = rng.choice([0, 1, 2, rng.randrange(1, seq_len + 2)])
            if kind in ("slash", "vertical_slash", "hybrid"):
                p.slash[r, h] = torch.tensor(
                    entries(num_slash, seq_len, rng.choice([0.0, 0.5, 1.0])))
            if kind in ("vertical", "vertical_slash", "hybrid"):
                p.vertical[r, h] = torch.tensor(
                    entries(num_vertical, seq_len, rng.choice([0.0, 0.5, 1.0])))
            if kind in ("blocks", "hybrid"):
                use_blocks = True
                density = rng.choice([0.2, 0.5, 0.9, 1.0])
                blocks[r, h] = torch.rand(nb, nb, generator=torch.Generator()
                                          .manual_seed(rng.randrange(2**31))) < density
    if use_blocks:
        p.blocks = blocks
        p.block = block
    return p
