"""A harness that drives casakv's real builder and impl with hand-built vLLM metadata.

It builds a real ``VllmConfig`` from a model folder holding only a
``config.json`` (Llama architecture, any attention shape), the builder with a
real ``FullAttentionSpec``, ``CasakvImpl`` layers, and batches as vLLM's model
runner hands them to a backend (``CommonAttentionMetadata``, shuffled block
tables with block 0 kept as the null block).  The KV of every position is
random and written through the impl's own cache update, so the reference can
attend over the same keys and values.  Used on the CPU (vLLM's CPU kernels)
and on CUDA (casakv's Triton kernels).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """One hand-built batch: metadata, cache, queries, and every request's K/V for the reference."""

    cm: object  # vllm CommonAttentionMetadata
    kv_cache: torch.Tensor
    query: torch.Tensor  # [num_tokens, H, D]
    keys: list  # per request [Hkv, seq_len, D] fp32
    values: list
    q_lens: list
    seq_lens: list


class Harness:
    def __init__(self, root):
        self.root = root

    def config(self, casakv: dict | None = None, num_heads=8, num_kv_heads=2, head_size=64, num_layers=4,
               dtype="bfloat16", max_model_len=4096, max_num_seqs=16, device="cpu", compaction=False):
        """A VllmConfig for a small Llama shape.  ``device`` is named, not inferred: on a GPU box vLLM's
        Python layer runs without its compiled ops, under a platform that infers no device.
        ``compaction``: casakv's scheduler is named, so workers compact (as ``vllm serve`` sets it up)."""
        from vllm.config import DeviceConfig, ModelConfig, SchedulerConfig, VllmConfig

        folder = self.root / f"llama-{num_heads}-{num_kv_heads}-{head_size}-{num_layers}"
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text(json.dumps({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": num_heads * head_size,
            "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads, "head_dim": head_size,
            "num_hidden_layers": num_layers, "intermediate_size": 4 * num_heads * head_size, "vocab_size": 32000,
            "max_position_embeddings": max_model_len, "rms_norm_eps": 1e-5, "torch_dtype": dtype}))
        model = ModelConfig(model=str(folder), skip_tokenizer_init=True, dtype=dtype, max_model_len=max_model_len)
        sched = SchedulerConfig(max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                                max_num_batched_tokens=max(8192, max_model_len), is_encoder_decoder=False)
        if compaction:
            from casakv_vllm.integration.scheduler import PATH

            sched.scheduler_cls = PATH
        return VllmConfig(model_config=model, scheduler_config=sched, device_config=DeviceConfig(device=device),
                          additional_config={"casakv": casakv} if casakv else {})

    def backend(self, vc, block_size, device):
        """(builder, impl) for ``vc``'s attention shape on ``device``."""
        from vllm.v1.kv_cache_interface import FullAttentionSpec

        from casakv_vllm.integration.builder import CasakvMetadataBuilder
        from casakv_vllm.integration.impl import CasakvImpl

        m = vc.model_config
        num_heads, num_kv = m.get_num_attention_heads(vc.parallel_config), m.get_num_kv_heads(vc.parallel_config)
        head_size = m.get_head_size()
        spec = FullAttentionSpec(block_size=block_size, num_kv_heads=num_kv, head_size=head_size, dtype=m.dtype)
        builder = CasakvMetadataBuilder(spec, [f"model.layers.{i}.self_attn.attn" for i in range(4)], vc,
                                        torch.device(device))
        impl = CasakvImpl(num_heads, head_size, head_size ** -0.5, num_kv)
        return builder, impl

    def requests(self, rows: list[tuple[int, dict | None]]):
        """Register one request per row (prompt length, vllm_xargs) with a fresh tracker and observation
        store (as a new engine would have); returns the SamplingParams objects (keep them alive: they key
        the requests' state)."""
        from vllm.sampling_params import SamplingParams
        from vllm.v1.sample.logits_processor import BatchUpdate

        from casakv_vllm.integration.context import worker_context
        from casakv_vllm.integration.tracker import RequestTracker
        from casakv_vllm.observe.store import ObservationStore

        worker_context().observations = ObservationStore()  # a new engine: its prompts' observations only
        tracker = RequestTracker(None, torch.device("cpu"), False)
        params = [SamplingParams(extra_args=x) for _, x in rows]
        tracker.update_state(BatchUpdate(len(rows), [], [(i, p, list(range(plen)), []) for i, (p, (plen, _))
                                                         in enumerate(zip(params, rows))], []))
        return params

    def batch(self, impl, q_lens, ctx_lens, block_size, dtype, device, seed=0, writer=None, keys=None) -> Batch:
        """Random batch; K/V written by ``writer(key, value, kv_cache, slots)`` (default: the impl's
        cache update, i.e. the device's layout); ``keys``: each row's ``[Hkv, seq_len, D]`` keys instead of
        random ones."""
        g = torch.Generator().manual_seed(seed)
        h, hkv, d = impl.num_heads, impl.num_kv_heads, impl.head_size
        seq_lens = [q + c for q, c in zip(q_lens, ctx_lens)]
        nblocks = [-(-s // block_size) for s in seq_lens]
        total = sum(nblocks) + 3
        perm = (torch.randperm(total - 1, generator=g) + 1).tolist()  # block 0: the null block
        table = torch.zeros(len(seq_lens), max(nblocks) + 1, dtype=torch.int32)
        for i, n in enumerate(nblocks):
            table[i, :n] = torch.tensor([perm.pop() for _ in range(n)])
        kv_cache = torch.zeros(total, hkv, block_size, 2 * d, dtype=dtype, device=device)
        keys = [(torch.randn(hkv, s, d, generator=g) if keys is None else keys[i].cpu()).to(dtype).float()
                for i, s in enumerate(seq_lens)]
        values = [torch.randn(hkv, s, d, generator=g).to(dtype).float() for s in seq_lens]
        write = writer or (lambda k, v, c, s: impl.do_kv_cache_update(None, k, v, c, s))
        for i, s in enumerate(seq_lens):  # every position's K/V
            pos = torch.arange(s)
            slots = (table[i, pos // block_size].long() * block_size + pos % block_size).to(device)
            write(keys[i].transpose(0, 1).to(dtype).to(device).contiguous(),
                  values[i].transpose(0, 1).to(dtype).to(device).contiguous(), kv_cache, slots)
        query = torch.randn(sum(q_lens), h, d, generator=g).to(dtype).to(device)
        return Harness._step(table.to(device), kv_cache, query, keys, values, q_lens, ctx_lens)

    @staticmethod
    def at(batch: Batch, q_lens: list, ctx_lens: list, seed: int = 0) -> Batch:
        """The same requests, cache and K/V at another step: new queries and lengths (every position's K/V
        was written by ``batch``, which must cover the new lengths)."""
        g = torch.Generator().manual_seed(seed)
        assert all(q + c <= k.shape[1] for q, c, k in zip(q_lens, ctx_lens, batch.keys))
        h, d = batch.query.shape[1:]
        query = torch.randn(sum(q_lens), h, d, generator=g).to(batch.query.dtype).to(batch.query.device)
        return Harness._step(batch.cm.block_table_tensor, batch.kv_cache, query, batch.keys, batch.values, q_lens,
                             ctx_lens)

    @staticmethod
    def _step(table_dev: torch.Tensor, kv_cache, query, keys, values, q_lens: list, ctx_lens: list) -> Batch:
        """The metadata of one step: rows computing ``q_lens`` positions after ``ctx_lens`` of context."""
        from vllm.v1.attention.backend import CommonAttentionMetadata

        device = table_dev.device
        table = table_dev.cpu()
        block_size = kv_cache.shape[2]
        seq_lens = [q + c for q, c in zip(q_lens, ctx_lens)]
        qsl = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
        sl = torch.tensor(seq_lens, dtype=torch.int32)
        slot_mapping = torch.cat([table[i, torch.arange(c, c + q) // block_size].long() * block_size
                                  + torch.arange(c, c + q) % block_size
                                  for i, (q, c) in enumerate(zip(q_lens, ctx_lens))])
        cm = CommonAttentionMetadata(
            query_start_loc=qsl.to(device), query_start_loc_cpu=qsl, seq_lens=sl.to(device), num_reqs=len(q_lens),
            num_actual_tokens=sum(q_lens), max_query_len=max(q_lens), max_seq_len=max(seq_lens),
            block_table_tensor=table_dev, slot_mapping=slot_mapping.to(device), seq_lens_cpu_upper_bound=sl)
        return Batch(cm, kv_cache, query, keys, values, list(q_lens), seq_lens)

    @staticmethod
    def forward(builder, impl, batch: Batch, layer: int = 0) -> torch.Tensor:
        md = builder.build(0, batch.cm)
        out = torch.full_like(batch.query, float("nan"))
        impl.forward(_Layer(f"model.layers.{layer}.self_attn.attn"), batch.query, None, None, batch.kv_cache, md,
                     out)
        return out

    @staticmethod
    def reference(batch: Batch, scale: float, allowed=None) -> torch.Tensor:
        """fp32 attention per request; ``allowed(i, q_pos, seq_len)`` -> ``[Hkv, Q, S]`` bool, or None (causal)."""
        outs = []
        for i, (q_len, s) in enumerate(zip(batch.q_lens, batch.seq_lens)):
            start = sum(batch.q_lens[:i])
            q = batch.query[start:start + q_len].float().cpu().transpose(0, 1)  # [H, q, D]
            k, v = batch.keys[i][:, :s], batch.values[i][:, :s]  # a later step of a longer batch: its positions
            group = q.shape[0] // k.shape[0]
            pos = torch.arange(s - q_len, s)
            mask = torch.arange(s)[None, :] <= pos[:, None]
            mask = mask.expand(k.shape[0], q_len, s)
            if allowed is not None and allowed(i, pos, s) is not None:
                mask = mask & allowed(i, pos, s).cpu()
            logits = q @ k.repeat_interleave(group, 0).transpose(1, 2) * scale
            logits = logits.masked_fill(~mask.repeat_interleave(group, 0), float("-inf"))
            outs.append((torch.softmax(logits, -1) @ v.repeat_interleave(group, 0)).transpose(0, 1))
        return torch.cat(outs)


@dataclass
class _Layer:
    layer_name: str


def check_prefill_compression(harness: Harness, device: str, forward, shape=(6, 2, 64), block_size: int = 16,
                              dtype=torch.float32, prompt: int = 400, chunk: int = 64, decode: int = 4,
                              tol: float = 2e-5, kv_layout: bool = False) -> int:
    """A prompt prefilled in ``chunk``-token steps under ``prefill_compression`` (snapkv at 4x, events every
    32 tokens), then ``decode`` steps: every step after the first event attends to exactly the positions
    its head kept plus the uncompacted tail, as an fp32 reference over the original keys says; blocks are
    poisoned (NaN) once the rule frees them.  ``forward(builder, impl, batch)`` runs one layer; ``kv_layout``:
    the cache is written in casakv's K|V layout (the GPU path's, also on CPU tensors).  Returns the steps
    checked."""
    from casakv_vllm.integration.context import worker_context

    h, hkv, d = shape
    server = {"policy": "snapkv", "kv_ratio": 0.25, "kv_min": 0, "prefill_compression": True, "chunk_size": 32}
    vc = harness.config(server,
                        num_heads=h, num_kv_heads=hkv, head_size=d, dtype=str(dtype).split(".")[1], device=device,
                        compaction=True)
    builder, impl = harness.backend(vc, block_size, device)
    params = harness.requests([(prompt, None)])
    full = harness.batch(impl, [1], [prompt + decode - 1], block_size, dtype, device, seed=9,
                         writer=(lambda k, v, c, sl: torch.ops.casakv.reshape_and_cache(k, v, c, sl)) if kv_layout
                         else None)
    state = worker_context().requests.rows[0]
    steps = [(min(chunk, prompt - c), c) for c in range(0, prompt, chunk)] + [(1, prompt + i) for i in range(decode)]
    freed, checked = set(), 0
    for q_len, ctx in steps:
        b = harness.at(full, [q_len], [ctx], seed=ctx)
        keep = state.keep.get(0)
        before = None if keep is None else (keep.positions(keep.capacity).clone(), keep.mask.clone(), state.layout)
        out = forward(builder, impl, b)
        if before is not None:  # a step reading compacted KV: the positions kept, then the tail
            pos, mask, layout = before
            seq = b.seq_lens[0]
            kept = torch.zeros(hkv, seq, dtype=torch.bool)
            for head in range(hkv):
                cols = mask[head, :layout.head_end].nonzero().flatten()
                kept[head, pos[head, cols].cpu()] = True
            kept[:, layout.tail:] = True
            assert layout.width(seq) == int(kept[0].sum()), "a live column was not kept"
            ref = harness.reference(b, impl.scale, lambda i, q, s: kept.unsqueeze(1).expand(hkv, len(q), s))
            torch.testing.assert_close(out.float().cpu(), ref, atol=tol, rtol=tol)
            checked += 1
        terms = state.compaction
        tail = terms.settled_tail(b.seq_lens[0])
        for blk in range((terms.head_end if tail else 0) // block_size, (tail or 0) // block_size):
            if blk not in freed:  # the scheduler frees once the step settled: another request's now
                freed.add(blk)
                full.kv_cache[b.cm.block_table_tensor[0, blk].long()] = float("nan")
    assert freed and params
    return checked



def check_question(harness: Harness, device: str, forward, shape=(6, 2, 64), block_size: int = 16,
                   dtype=torch.float32, prompt: int = 120, question_at: int = 100, decode: int = 3,
                   tol: float = 2e-5, kv_layout: bool = False) -> int:
    """A request whose question starts at ``question_at`` (``casakv_question_at``; snapkv keeping 48): its
    keep-set is the one its context gets served alone (same keys and queries, another engine); the
    question's prefill rows and its decode steps attend to exactly that keep-set plus every question and
    generated token (an fp32 reference), the context's own rows to all of it; blocks are poisoned once the
    rule frees them.  Returns the steps checked."""
    from casakv_vllm.integration.context import worker_context

    h, hkv, d = shape
    snap = {"casakv_policy": "snapkv", "casakv_kv_budget": 48}
    vc = harness.config({"policy": "dense"}, num_heads=h, num_kv_heads=hkv, head_size=d,
                        dtype=str(dtype).split(".")[1], device=device, compaction=True)
    builder, impl = harness.backend(vc, block_size, device)
    full = harness.batch(impl, [1], [prompt + decode - 1], block_size, dtype, device, seed=4,
                         writer=(lambda k, v, c, sl: torch.ops.casakv.reshape_and_cache(k, v, c, sl)) if kv_layout
                         else None)
    g = torch.Generator().manual_seed(1)
    queries = torch.randn(prompt + decode, h, d, generator=g).to(dtype).to(device)

    def step(ctx, n):
        return Harness._step(full.cm.block_table_tensor, full.kv_cache, queries[ctx:ctx + n], full.keys,
                             full.values, [n], [ctx])

    cache = full.kv_cache.clone()  # the context's decode step compacts it: restored for the question
    alone = harness.requests([(question_at, snap)])
    for ctx, n in ((0, 64), (64, question_at - 64), (question_at, 1)):
        forward(builder, impl, step(ctx, n))
    want = kept_positions(worker_context().requests.rows[0].keep[0], question_at)
    full.kv_cache.copy_(cache)
    asked = harness.requests([(prompt, {**snap, "casakv_question_at": question_at})])
    state = worker_context().requests.rows[0]
    forward(builder, impl, step(0, 64))
    freed, checked = set(), 0
    for ctx, n in ((64, prompt - 64),) + tuple((prompt + i, 1) for i in range(decode)):
        b = step(ctx, n)
        out = forward(builder, impl, b)

        def allowed(i, pos, s):
            mask = torch.ones(hkv, len(pos), s, dtype=torch.bool)
            mask[:, pos >= question_at, :question_at] = want.unsqueeze(1)  # the question: the keep-set
            return mask

        torch.testing.assert_close(out.float().cpu(), harness.reference(b, impl.scale, allowed), atol=tol, rtol=tol)
        assert torch.equal(kept_positions(state.keep[0], ctx + n)[:, :question_at], want)
        checked += 1
        terms = state.compaction
        tail = terms.settled_tail(ctx + n)
        for blk in range(terms.head_end // block_size, (tail or 0) // block_size):
            if blk not in freed:  # the scheduler frees once the step settled: another request's now
                freed.add(blk)
                full.kv_cache[b.cm.block_table_tensor[0, blk].long()] = float("nan")
    assert freed and alone and asked and int(want[0].sum()) == 48
    return checked


def kept_positions(keep, width: int) -> torch.Tensor:
    """``[Hkv, width]`` bool over positions (on the CPU): what a keep-set (over positions or live columns)
    keeps."""
    out = torch.zeros(keep.mask.shape[0], width, dtype=torch.bool)
    cols, mask = keep.positions(keep.capacity).cpu(), keep.mask.cpu()
    for h in range(out.shape[0]):
        pos = cols[h][mask[h] & (cols[h] >= 0) & (cols[h] < width)]
        out[h, pos] = True
    return out
