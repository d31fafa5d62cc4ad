"""Plain-torch references for the Triton kernels in this package.

These are deliberately simple (a Python loop over requests, fp32 math) and
are meant for tests and debugging only, never for the serving path.

Layout conventions (vLLM V1):
  * ``kv_cache``: logical shape [num_blocks, num_kv_heads, block_size,
    2 * head_size]; K is ``[..., :head_size]`` and V is ``[..., head_size:]``.
    Any strides are accepted.
  * ``query``: [num_tokens, num_heads, head_size], the tokens of all
    requests packed; request ``i`` owns rows
    ``query_start_loc[i]:query_start_loc[i + 1]``.
  * ``seq_lens[i]`` is the total KV length of request ``i`` (context plus its
    new query tokens); the query tokens are the last ``q_len_i`` positions.
"""

from __future__ import annotations

import torch


def gather_kv(
    kv_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, 2*head_size]
    block_table_row: torch.Tensor,  # [max_blocks_per_seq] int32
    seq_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather the first ``seq_len`` K and V tokens of one request.

    Returns (k, v), each fp32 [seq_len, num_kv_heads, head_size].
    """
    block_size = kv_cache.shape[2]
    head_size = kv_cache.shape[3] // 2
    num_blocks_needed = (seq_len + block_size - 1) // block_size
    blocks = block_table_row[:num_blocks_needed].long()
    # [n, kvh, bs, 2hs] -> [n, bs, kvh, 2hs] -> [n*bs, kvh, 2hs]
    kv = kv_cache[blocks].permute(0, 2, 1, 3).reshape(
        num_blocks_needed * block_size, kv_cache.shape[1], 2 * head_size)
    kv = kv[:seq_len].float()
    return kv[..., :head_size], kv[..., head_size:]


def paged_attention_ref(
    query: torch.Tensor,  # [num_tokens, num_heads, head_size]
    kv_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, 2*head_size]
    block_table: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    scale: float,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal paged attention in fp32.

    Returns ``out``: fp32 [num_tokens, num_heads, head_size] where only the
    rows ``0 .. query_start_loc[-1] - 1`` are computed (rows past that are
    zero).  With ``return_lse=True`` also returns the natural-log
    log-sum-exp of the scaled scores, fp32 [num_tokens, num_heads]
    (rows past the real tokens are ``-inf``).
    """
    def causal(i: int, q_pos: torch.Tensor, seq_len: int) -> torch.Tensor:
        kv_pos = torch.arange(seq_len, device=query.device)
        return (kv_pos[None, :] <= q_pos[:, None])[None]  # [1, q_len, seq_len]

    out, lse = masked_paged_attention_ref(query, kv_cache, block_table, query_start_loc, seq_lens, scale,
                                          causal)
    if return_lse:
        return out, lse
    return out


def masked_paged_attention_ref(
    query: torch.Tensor,  # [num_tokens, num_heads, head_size]
    kv_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, 2*head_size]
    block_table: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    scale: float,
    mask_fn,  # (request i, q_pos [q_len], seq_len) -> bool [num_heads or 1, q_len, seq_len]
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 paged attention where ``mask_fn`` says which (query, key) pairs count.

    Returns ``(out, lse)`` as :func:`paged_attention_ref` does with
    ``return_lse=True``; shared by the dense and the pattern references.
    """
    num_tokens, num_heads, head_size = query.shape
    num_kv_heads = kv_cache.shape[1]
    assert num_heads % num_kv_heads == 0
    group = num_heads // num_kv_heads
    out = torch.zeros(num_tokens, num_heads, head_size, dtype=torch.float32,
                      device=query.device)
    lse = torch.full((num_tokens, num_heads), float("-inf"),
                     dtype=torch.float32, device=query.device)
    qsl = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for i, seq_len in enumerate(lens):
        q_start, q_end = qsl[i], qsl[i + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        ctx = seq_len - q_len
        assert ctx >= 0, "seq_len must include the query tokens"
        k, v = gather_kv(kv_cache, block_table[i], seq_len)
        # GQA: query head h reads kv head h // group.
        k = k.repeat_interleave(group, dim=1)  # [seq_len, num_heads, hs]
        v = v.repeat_interleave(group, dim=1)
        q = query[q_start:q_end].float()  # [q_len, num_heads, hs]
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        q_pos = ctx + torch.arange(q_len, device=query.device)
        scores = scores.masked_fill(~mask_fn(i, q_pos, seq_len), float("-inf"))
        lse[q_start:q_end] = torch.logsumexp(scores, dim=-1).transpose(0, 1)
        probs = torch.softmax(scores, dim=-1)
        out[q_start:q_end] = torch.einsum("hqk,khd->qhd", probs, v)
    return out, lse


def reshape_and_cache_ref(
    key: torch.Tensor,  # [num_tokens_padded, num_kv_heads, head_size]
    value: torch.Tensor,  # [num_tokens_padded, num_kv_heads, head_size]
    kv_cache: torch.Tensor,  # [num_blocks, num_kv_heads, block_size, 2*head_size]
    slot_mapping: torch.Tensor,  # [n] int64, n <= num_tokens_padded; -1 = pad
) -> None:
    """Write K/V of each token into its cache slot, in place.

    Token ``t`` with slot ``s = slot_mapping[t] >= 0`` goes to block
    ``s // block_size``, offset ``s % block_size``.  Negative slots are
    padding and are skipped.
    """
    block_size = kv_cache.shape[2]
    head_size = kv_cache.shape[3] // 2
    n = slot_mapping.shape[0]
    for t, s in enumerate(slot_mapping.tolist()):
        if t >= n or s < 0:
            continue
        blk, off = s // block_size, s % block_size
        kv_cache[blk, :, off, :head_size] = key[t].to(kv_cache.dtype)
        kv_cache[blk, :, off, head_size:] = value[t].to(kv_cache.dtype)
