"""Rows a policy restricts, in torch, on either device: masked attention and compaction events.

- Pattern rows attend through their pattern's mask; evicting rows that
  decode read their request's keep-set (made at the first decode step, then
  updated by the policy's eviction hooks).  The CPU path runs every such row
  here; the CUDA path runs here only what its kernels cannot express
  (``plan.gpu``: eviction while generating, long generations whose events rank
  by attention, batches mixing prefill and decode).
- Compaction (:func:`compact_row`): in a compaction event, each layer, after
  its attention, moves what it keeps into the leading slots (CPU: torch
  copies in vLLM's CPU layout; CUDA: ``casakv::compact_kv``), and the keep-set
  becomes columns of the new live layout.

On CUDA nothing here synchronises with the host: the KV counts for metrics
are only taken on the CPU (``count``).
"""

from __future__ import annotations

import time

import torch

from casakv_kernels.patterns import pattern_mask
from casakv_vllm.compress.compact import compact_cpu, compact_gpu, plan_layer, tail_skip_bits
from casakv_vllm.ops.paged import gather_kv
from casakv_vllm.ops.probs import group_sum, grouped_logits
from casakv_vllm.ops.torch_attention import attend, decode_attention
from casakv_vllm.plan.batch import RowPlan


class RowKV:
    """Each row's keys and values over the columns it reads, gathered once per layer call: its positions,
    or once compacted only its live blocks (planned by the builder: the freed ones may be another
    request's now)."""

    def __init__(self, kv_cache: torch.Tensor, md, layout: str = "vec") -> None:
        self.kv_cache, self.md, self.layout = kv_cache, md, layout
        self.gathered: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, row: RowPlan) -> tuple[torch.Tensor, torch.Tensor]:
        if row.index not in self.gathered:
            if row.read is None:
                blocks = self.md.block_table[row.index, : -(-row.seq_len // self.kv_cache.shape[2])].long()
                kv = gather_kv(self.kv_cache, blocks, row.seq_len, self.layout)
            else:
                kv = gather_kv(self.kv_cache, self.md.plan.live_blocks[row.index], row.read.width(row.seq_len),
                               self.layout)
            self.gathered[row.index] = kv
        return self.gathered[row.index]


def causal_pairs(row: RowPlan, context: int | None = None) -> int:
    """(query, KV) pairs of causal attention after ``context`` columns (default: the row's positions)."""
    ctx = row.context_len if context is None else context
    return row.q_len * ctx + row.q_len * (row.q_len + 1) // 2


def attend_row(row: RowPlan, query: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], layer: int,
               scale: float, out: torch.Tensor, patterns, count: bool = True) -> int | None:
    """Attention of one row in torch; returns the KV tokens it read (None unless ``count``).

    ``kv``: the row's keys and values over the columns it reads (its positions, or once compacted its
    live slots), ``[Hkv, width, D]`` each.
    """
    k, v = kv
    ctx, seq_len = (row.read_context if row.live_dense else row.context_len), row.seq_len
    device = query.device
    q = query[row.q_start:row.q_start + row.q_len].transpose(0, 1)  # [H, q_len, D]
    keep = None
    if row.evicting:
        keep = row.state.keep.get(layer)
        if keep is None:
            obs = row.obs.layer(layer, row.select_len < row.prompt_len) if row.obs is not None else None
            keep = row.state.keep[layer] = row.policy.start(layer, row.select_len, k, obs, scale, seq_len)
        layout = row.read
        width = seq_len if layout is None else layout.width(seq_len)
        if row.asks:  # the question enters whole; the policy's eviction starts with decoding
            keep.grow(width)
        else:  # over live columns once compacted
            row.policy.prepare_step(keep, layer, row.select_len, seq_len, width)
        allowed = keep.visible(width).unsqueeze(1)  # [Hkv, 1, S]: a decode row sees every position before it
        if row.q_len > 1:  # positions of the columns: causal order among the queries' own tokens
            cols = torch.arange(seq_len, device=device) if layout is None else torch.cat(
                [torch.zeros(layout.head_end, dtype=torch.long, device=device),
                 torch.arange(layout.tail, seq_len, device=device)])
            qpos = torch.arange(ctx, seq_len, device=device).unsqueeze(1)
            if row.asks:  # the context's own queries (before the question) attend to all of it
                allowed = allowed | (qpos < row.select_len)
            allowed = allowed & (cols.unsqueeze(0) <= qpos)
    elif not row.dense:
        allowed = pattern_mask(patterns, row.index, torch.arange(ctx, seq_len, device=device), seq_len)
    else:
        allowed = None
    if row.q_len == 1:
        o, probs = decode_attention(q, k, v, scale, allowed)
        if keep is not None and row.policy.caps.observes_decode:
            row.policy.observe(keep, probs)
        elif keep is not None and row.compact and row.read is not None:  # a later event ranks by this query
            keep.set_rank(group_sum(probs, keep.mask.shape[0]).reshape(keep.mask.shape[0], -1))
            row.policy.on_event(keep, layer, q, k, allowed, scale, row.seq_len - row.prompt_len)
    else:
        o = attend(q, k, v, ctx, scale, allowed)
    out[row.q_start:row.q_start + row.q_len] = o.transpose(0, 1).to(out.dtype)
    if not count:
        return None
    return int(allowed.sum()) if allowed is not None else k.shape[0] * causal_pairs(row, ctx)


#: the prefill chunk's last queries whose votes rank a prefill event (SnapKV's observation window)
VOTE_WINDOW = 32
#: max-pool width over columns of the votes (SnapKV's clustering kernel)
VOTE_POOL = 7
#: the prompt's last chunk's queries a policy's prompt event reads (the estimator's evidence)
LAST_QUERIES = 64


def prefill_rank(row: RowPlan, layer: int, query: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                 scale: float) -> None:
    """A prefill event (``terms.prefill``): rank every live column by the votes of the chunk's last
    ``VOTE_WINDOW`` queries (attention summed over them and the heads of each group, max-pooled), into
    ``LayerKeep.rank``; the request's keep-set starts here (everything kept) at its first event.  At the
    prompt's last chunk the policy may reshape that rank (``KeepPolicy.on_prompt_event``)."""
    from casakv_vllm.policies.keepset import LayerKeep

    k, _ = kv  # [Hkv, width, D] over the columns the row read
    num_kv, width = k.shape[0], k.shape[1]
    keep = row.state.keep.get(layer)
    if keep is None:
        keep = row.state.keep[layer] = LayerKeep.new(torch.ones(num_kv, 0, dtype=torch.bool, device=k.device),
                                                     row.seq_len)
    keep.grow(width)
    w = min(VOTE_WINDOW, row.q_len)
    end = row.q_start + row.q_len
    q = query[end - w:end].transpose(0, 1)  # [H, w, D]
    group = q.shape[0] // num_kv
    logits = grouped_logits(q, k, scale)  # [Hkv, g*w, S]
    qpos = torch.arange(row.seq_len - w, row.seq_len, device=k.device).repeat(group)
    visible = keep.positions(width).unsqueeze(1) <= qpos.view(1, -1, 1)  # causal; empty slots (-1) too
    visible &= keep.mask[:, :width].unsqueeze(1)
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num_(0.0)
    keep.set_rank(torch.nn.functional.max_pool1d(probs.sum(1, keepdim=True), VOTE_POOL, 1, VOTE_POOL // 2).squeeze(1))
    if row.context_len + row.q_len >= row.prompt_len:  # the prompt's last chunk: its policy may reshape the rank
        last = min(row.q_len, LAST_QUERIES)
        row.policy.on_prompt_event(keep, layer, query[end - last:end].transpose(0, 1), k,
                                   keep.positions(width), scale, row.seq_len, row.q_len)


def compact_row(row: RowPlan, layer: int, kv_cache: torch.Tensor, table_row: torch.Tensor, plan,
                layout: str, scratch: torch.Tensor | None = None) -> None:
    """After a compaction event's attention at ``layer``: move what the layer keeps of ``[shared, T)``
    into the compacted region; its keep-set (and scores) become columns of the new live layout, so later
    steps read a prefix of them (``layout``: the cache's, ``ops.paged``).

    A later event of a select-once policy whose region overflows keeps the tokens this step's query
    attends to most (TOVA's rule; ``LayerKeep.rank``, set by ``attend_row``).  In casakv's K|V layout
    (CUDA) each head's empty region slots and its first tail block's evicted tokens are noted in
    ``state.holes`` (what the decode kernel skips)."""
    t0 = time.perf_counter()
    state = row.state
    keep = state.keep[layer]
    scores = keep.scores if keep.scores is not None else keep.rank
    step = plan_layer(keep.mask, state.compaction, row.read, row.compact_tail, scores,
                      fit=row.read is not None or state.compaction.prefill)
    if kv_cache.device.type == "cpu" and layout != "kv":
        compact_cpu(kv_cache, table_row, step, layout)
    else:
        compact_gpu(kv_cache, table_row, step, scratch)
    keep.pos = step.remap(keep.positions(keep.capacity), -1)
    keep.mask = step.remap(keep.mask, False)
    keep.rank = None
    if keep.scores is not None:
        keep.scores = step.remap(keep.scores, 0.0)
    if layout == "kv":
        terms = state.compaction
        if state.holes is None:
            state.holes = torch.zeros(plan.num_layers, step.count.shape[0], 3, dtype=torch.int32,
                                      device=kv_cache.device)
        state.holes[layer, :, 0] = (step.count + step.shared).to(torch.int32)
        state.holes[layer, :, 1] = terms.head_end
        state.holes[layer, :, 2] = tail_skip_bits(keep.mask, terms.head_end, terms.block_size)
    if plan.stats is not None:
        plan.stats.record_compaction(time.perf_counter() - t0)
