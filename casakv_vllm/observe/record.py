"""Recording a prompt's observations: planned per batch, executed per layer.

``plan_record`` runs in the metadata builder (host only): it decides which of
a prefill row's queries fall in the prompt's observation window and whether
the row adds its attention mass to the column sums, and marks them recorded.
``record_layer`` runs in each layer's forward on either path: it copies the
window queries into the prompt's device buffers (slices, no index tensors,
no host sync) and, for column sums, computes the chunk's attention
probabilities in torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from casakv_vllm.observe.store import PromptObservations
from casakv_vllm.ops.probs import attention_probs, group_sum

#: query rows per block when column sums are computed (bounds memory)
ROWS_PER_BLOCK = 256


@dataclass
class RecordJob:
    """What one prefill row records in every layer of this step.

    Attributes:
        row: the row of the batch.
        q_start: the row's first query token in the batch.
        ctx: prompt tokens before this chunk.
        rows: prompt tokens in this chunk (``ctx + rows <= prompt_len``).
        win_src, win_dst, win_n: ``win_n`` window rows, from chunk row
            ``win_src`` into window row ``win_dst``.
        col_sums: add the chunk's attention mass per key to the column sums.
        at_end: the row's policy hook ``on_prompt_observed`` when the chunk ends the prompt (None
            otherwise): it runs after the window is recorded, with the prompt's keys.
    """

    obs: PromptObservations
    row: int
    q_start: int
    ctx: int
    rows: int
    win_src: int
    win_dst: int
    win_n: int
    col_sums: bool
    at_end: Callable | None = None


def plan_record(obs: PromptObservations, row: int, q_start: int, ctx: int, q_len: int,
                want_col_sums: bool, at_end: Callable | None = None) -> RecordJob | None:
    """Plan one prefill row's recording (and mark it as recorded); None when it records nothing.
    ``at_end`` is kept only when the chunk ends the prompt."""
    plen = obs.prompt_len
    end = min(ctx + q_len, plen)
    if ctx >= end:
        return None
    lo = plen - obs.window
    first = max(ctx, lo)
    win_n = max(0, end - first)
    col = want_col_sums and obs.col_rows == ctx
    for i in range(first - lo, first - lo + win_n):
        obs.window_seen[i] = True
    if col:
        obs.col_rows = end
    if win_n == 0 and not col:
        return None
    return RecordJob(obs, row, q_start, ctx, end - ctx, first - ctx, first - lo, win_n, col,
                     at_end if end == plen else None)


def record_layer(job: RecordJob, layer: int, query: torch.Tensor, scale: float,
                 keys: Callable[[], torch.Tensor]) -> None:
    """Record ``layer`` of one planned row.

    Args:
        query: ``[num_tokens, num_heads, D]``, the batch's queries.
        keys: returns ``[num_kv_heads, >= ctx + rows, D]``, the row's keys so far
            (called only for column sums and ``at_end``).
    """
    if job.win_n:
        buf = job.obs.window_buffer(layer, query)
        src = job.q_start + job.win_src
        buf[:, job.win_dst:job.win_dst + job.win_n] = query[src:src + job.win_n].transpose(0, 1)
    if job.col_sums:
        k = keys()
        q = query[job.q_start:job.q_start + job.rows].transpose(0, 1)  # [H, rows, D]
        sums = job.obs.col_buffer(layer, k.shape[0], k.device)
        for r0 in range(0, job.rows, ROWS_PER_BLOCK):
            r1 = min(job.rows, r0 + ROWS_PER_BLOCK)
            probs = attention_probs(q[:, r0:r1], k[:, :job.ctx + r1], job.ctx + r0, scale)
            sums[:, :job.ctx + r1] += group_sum(probs, k.shape[0]).sum(1)
    if job.at_end is not None and layer in job.obs.window_q:
        job.at_end(layer, job.obs.layer(layer), keys()[:, :job.obs.prompt_len], scale)
