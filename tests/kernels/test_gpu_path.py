"""The CUDA path: the real builder's device plan and the impl's launches, driven with hand-built vLLM
metadata for every policy the GPU path serves, mixed per-request policies in one batch included;
and the custom ops under CUDA graphs and torch.compile.

On a CUDA machine the batches go through ``CasakvImpl.forward`` at Llama-3-8B attention shapes.
Without one, the same device plan and launches run on CPU tensors under ``TRITON_INTERPRET=1`` at
small shapes (the impl would pick its CPU path there, so the test calls the planned GPU layer
directly)."""

import random
from dataclasses import dataclass

import pytest
import torch

from casakv_kernels.patterns import pattern_mask

CUDA = torch.cuda.is_available()
gpu_only = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")]
DEVICE = "cuda" if CUDA else "cpu"
# (q heads, kv heads, head size): Llama-3-8B on the GPU, small under the interpreter
SHAPE = (32, 8, 128) if CUDA else (8, 2, 64)
BS = 16

CASES = {
    # name: (server config, per-row vllm_xargs, q_lens, ctx_lens)
    "dense-decode": ({}, [None, None, None], [1, 1, 1], [300, 77, 1000]),
    "dense-mixed": ({}, [None, None, None], [1, 120, 33], [300, 0, 500]),
    "dense-request-override": ({}, [{"casakv_policy": "dense"}, None], [1, 1], [90, 400]),
    "streaming-prefill": ({"policy": "streaming", "policy_params": {"sink": 4, "window": 37}}, [None, None],
                          [130, 40], [0, 300]),
    "streaming-decode": ({"policy": "streaming", "kv_budget": 64}, [None, None], [1, 1], [500, 90]),
    "mixed-policies": ({"policy": "streaming", "policy_params": {"sink": 4, "window": 37}},
                       [None, {"casakv_policy": "dense"}, None, {"casakv_policy": "dense"}], [1, 70, 64, 1],
                       [400, 100, 0, 260]),
}


def _gpu_forward(harness, builder, impl, batch, with_plan=False):
    """The planned GPU layer: ``impl.forward`` on CUDA, its GPU path on CPU tensors elsewhere."""
    from casakv_vllm.attention.gpu import run_layer_gpu

    md = builder.build(0, batch.cm)
    if not CUDA:  # a CPU builder: plan the batch for the GPU path as a CUDA one would
        builder._plan_gpu(md.plan, batch.cm, md.seq_lens, md.block_table)
    out = torch.full_like(batch.query, float("nan"))
    if CUDA:
        impl.forward(_Layer("model.layers.0.self_attn.attn"), batch.query, None, None, batch.kv_cache, md, out)
    else:
        run_layer_gpu(batch.query, batch.kv_cache, md, 0, impl.scale, out)
    return (out, md) if with_plan else out


@dataclass
class _Layer:
    layer_name: str


@pytest.mark.parametrize("case", list(CASES))
def test_gpu_layer_matches_reference(harness, case):
    import casakv_vllm.ops.custom  # noqa: F401
    from casakv_vllm.config import CasakvConfig
    from casakv_vllm.policies import build_policy

    server, xargs, q_lens, ctx = CASES[case]
    h, hkv, d = SHAPE
    vc = harness.config(server or None, num_heads=h, num_kv_heads=hkv, head_size=d, device=DEVICE)
    builder, impl = harness.backend(vc, BS, DEVICE)
    seq_lens = [q + c for q, c in zip(q_lens, ctx)]
    params = harness.requests([(s, x) for s, x in zip(seq_lens, xargs)])
    writer = None if CUDA else (lambda k, v, c, s: torch.ops.casakv.reshape_and_cache(k, v, c, s))
    batch = harness.batch(impl, q_lens, ctx, BS, torch.bfloat16, DEVICE, seed=len(case), writer=writer)
    out = _gpu_forward(harness, builder, impl, batch)
    policy = build_policy(CasakvConfig(**server))

    def allowed(i, pos, s):
        if policy.caps.attends_all or xargs[i] is not None:  # the server's pattern, or a dense request
            return None
        return pattern_mask(policy.patterns(0, [s], hkv, torch.device("cpu")), 0, pos, s)

    ref = harness.reference(batch, impl.scale, allowed)
    err = (out.float().cpu() - ref).norm() / ref.norm()
    assert torch.isfinite(out).all() and err < 1e-2, f"rel err {err:.2e}"
    assert params


def test_gpu_decode_runs_evicting_rows_in_torch(harness):
    """An evicting decode row beside a dense one (compaction off): the decode kernel skips it (count 0)
    and the torch path computes it over its keep-set; without observations SnapKV keeps sinks + recent
    tokens (``recency_keep``), and the new token."""
    import casakv_vllm.ops.custom  # noqa: F401
    from casakv_vllm.plan.gpu import plan_gpu
    from casakv_vllm.policies.selection import recency_keep

    h, hkv, d = SHAPE
    vc = harness.config({"policy": "snapkv", "kv_budget": 40}, num_heads=h, num_kv_heads=hkv, head_size=d,
                        device=DEVICE)
    builder, impl = harness.backend(vc, BS, DEVICE)
    ctx = [300, 120]
    params = harness.requests([(ctx[0], None), (ctx[1], {"casakv_policy": "dense"})])  # prompts: the contexts
    writer = None if CUDA else (lambda k, v, c, s: torch.ops.casakv.reshape_and_cache(k, v, c, s))
    batch = harness.batch(impl, [1, 1], ctx, BS, torch.bfloat16, DEVICE, seed=3, writer=writer)
    out = _gpu_forward(harness, builder, impl, batch)

    def allowed(i, pos, s):
        if i == 1:
            return None
        keep = torch.ones(hkv, 1, s, dtype=torch.bool)
        keep[:, 0, :ctx[0]] = recency_keep(hkv, ctx[0], 40)
        return keep

    ref = harness.reference(batch, impl.scale, allowed)
    err = (out.float().cpu() - ref).norm() / ref.norm()
    assert torch.isfinite(out).all() and err < 1e-2, f"rel err {err:.2e}"
    md = builder.build(0, batch.cm)
    gp = plan_gpu(md.plan, batch.cm.query_start_loc, md.seq_lens, md.block_table, 2, 1, max(ctx) + 1, h, hkv, d,
                  BS, torch.bfloat16, None)
    assert gp.kind == "decode" and gp.torch_rows == [0] and gp.decode_sel[1][0].tolist() == [0] * hkv
    assert params


def test_gpu_plan_kinds(harness):
    """One dense request naming the server's policy keeps the batch on the dense decode kernel (the bug
    that made a GPU engine raise); a pattern row makes it sparse with one index for every layer."""
    from casakv_vllm.plan.gpu import plan_gpu

    h, hkv, d = SHAPE
    for server, xargs, kind, layers in [({}, [{"casakv_policy": "dense"}, None], "decode", set()),
                                        ({"policy": "streaming", "kv_budget": 64}, [None, None], "sparse", {None})]:
        vc = harness.config(server or None, num_heads=h, num_kv_heads=hkv, head_size=d, device=DEVICE)
        builder, impl = harness.backend(vc, BS, DEVICE)
        params = harness.requests([(300, xargs[0]), (100, xargs[1])])
        batch = harness.batch(impl, [1, 1], [299, 99], BS, torch.bfloat16, DEVICE)
        md = builder.build(0, batch.cm)
        gp = plan_gpu(md.plan, batch.cm.query_start_loc, md.seq_lens, md.block_table, 2, 1, 300, h, hkv, d, BS,
                      torch.bfloat16, None)
        assert gp.kind == kind and set(gp.index) == layers
        assert params


def _raw_batch(q_lens, ctx_lens, dtype=torch.bfloat16, seed=0, hkv=2, group=4, d=64):
    g = torch.Generator(device="cuda").manual_seed(seed)
    seq_lens = [q + c for q, c in zip(q_lens, ctx_lens)]
    nb = [-(-s // BS) for s in seq_lens]
    total = sum(nb) + 1
    perm = (torch.randperm(total - 1, device="cuda", generator=g) + 1).tolist()
    table = torch.zeros(len(seq_lens), max(nb), dtype=torch.int32, device="cuda")
    for i, n in enumerate(nb):
        table[i, :n] = torch.tensor([perm.pop() for _ in range(n)], device="cuda")
    cache = torch.randn(total, hkv, BS, 2 * d, device="cuda", generator=g).to(dtype)
    q = torch.randn(sum(q_lens), hkv * group, d, device="cuda", generator=g).to(dtype)
    qsl = torch.tensor([0] + q_lens, device="cuda").cumsum(0).to(torch.int32)
    return q, cache, table, qsl, torch.tensor(seq_lens, dtype=torch.int32, device="cuda"), seq_lens


@pytest.mark.parametrize("physical", [False, True])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_sparse_decode_op_in_cuda_graph(physical):
    import casakv_vllm.ops.custom as ops
    from casakv_kernels.patterns import PatternBatch
    from casakv_kernels.sparse_decode import SparseDecodeWorkspace, physical_selection, selection_from_patterns
    from casakv_kernels.sparse_decode_reference import sparse_paged_decode_ref

    def ids(sel):  # what the kernel is given
        return physical_selection(sel, table) if physical else sel

    q, cache, table, qsl, sl, seq_lens = _raw_batch([1, 1], [700, 260])
    pat = PatternBatch.local(2, 2, 4, 37, device="cuda")
    sel, cnt = selection_from_patterns(pat, sl, BS, table.shape[1])
    given = ids(sel)
    ws = SparseDecodeWorkspace.allocate(4, q.shape[1], 64, device="cuda")
    out = torch.empty_like(q)
    ops.sparse_decode(q, cache, table, sl, given, cnt, 0.125, out, ws, physical)  # warm-up (compiles)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.sparse_decode(q, cache, table, sl, given, cnt, 0.125, out, ws, physical)
    # new contents, same addresses: replay must see them
    q.copy_(torch.randn_like(q))
    sl.copy_(torch.tensor([650, 261], device="cuda", dtype=torch.int32))
    sel2, cnt2 = selection_from_patterns(pat, sl, BS, table.shape[1])
    given.copy_(ids(sel2))
    cnt.copy_(cnt2)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    ref = sparse_paged_decode_ref(q, cache, table, sl, sel2, cnt2, 0.125)  # whole selected blocks
    assert torch.isfinite(out).all() and (out.float() - ref).norm() / ref.norm() < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_ops_under_torch_compile_fullgraph():
    import casakv_vllm.ops.custom as ops
    from casakv_kernels.patterns import PatternBatch
    from casakv_kernels.sparse_index import build_prefill_index
    from casakv_kernels.sparse_prefill import plan_blocks
    from casakv_kernels.sparse_reference import sparse_paged_attention_ref

    q, cache, table, qsl, sl, seq_lens = _raw_batch([5, 64], [40, 0])
    pat = PatternBatch.local(2, 2, 4, 37, device="cuda")
    bq, bn = plan_blocks(4, 64, 64, max(seq_lens), q.dtype, True)
    index = build_prefill_index(pat, qsl, sl, 64, max(seq_lens), bq, bn)

    def layer(x, out):
        y = x * 2.0  # ordinary ops around the opaque attention op
        ops.sparse_attention(y, cache, table, qsl, sl, 0.125, out, pat, index, 64, max(seq_lens))
        return out + 1.0

    compiled = torch.compile(layer, fullgraph=True)
    got = compiled(q, torch.empty_like(q))
    ref = sparse_paged_attention_ref(q * 2.0, cache, table, qsl, sl, 0.125, pat)[0] + 1.0
    assert (got.float() - ref).norm() / ref.norm() < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_builder_plans_wide_tiles_on_the_sparse_only_promise():
    """The device plan passes PatternBatch.sparse_only to the tile plan: a sparse-only batch in
    WIDE_SEQ at head size 128 gets WIDE_TILES, the same batch with a dense row the table's tiles."""
    from casakv_kernels import sparse_prefill
    from casakv_vllm.config import CasakvConfig
    from casakv_vllm.plan.batch import plan_batch
    from casakv_vllm.plan.gpu import plan_gpu
    from casakv_vllm.observe.store import ObservationStore
    from casakv_vllm.requests.resolve import PolicyResolver
    from casakv_vllm.requests.state import RequestTable

    n = sparse_prefill.WIDE_SEQ[0] + 200
    from vllm.sampling_params import SamplingParams

    for with_dense in (False, True):
        table = RequestTable()
        keep = [SamplingParams(), SamplingParams()]
        table.add(0, keep[0], n, (), "a")
        table.add(1, keep[1], 500, (("policy", "dense"),), "b")  # a dense row beside the sparse one
        resolver = PolicyResolver(CasakvConfig(policy="streaming", policy_params={"sink": 64, "window": 700}), 4)
        plan = plan_batch(table if with_dense else None, resolver, ObservationStore(),
                          [0, 300, 301] if with_dense else [0, 300], [n, 500] if with_dense else [n])
        assert [r.dense for r in plan.rows] == ([False, True] if with_dense else [False])
        qsl = torch.tensor([0, 300, 301][: len(plan.rows) + 1], dtype=torch.int32, device="cuda")
        sl = torch.tensor([r.seq_len for r in plan.rows], dtype=torch.int32, device="cuda")
        bt = torch.zeros(len(plan.rows), -(-n // BS), dtype=torch.int32, device="cuda")
        gp = plan_gpu(plan, qsl, sl, bt, int(qsl[-1]), 300, n, 8, 2, 128, BS, torch.bfloat16, None)
        ix = gp.index[None]
        wide = (ix.block_q, ix.block_n) == (sparse_prefill.WIDE_TILES[0] // 4, sparse_prefill.WIDE_TILES[1])
        assert wide == (not with_dense) and gp.patterns[None].sparse_only == (not with_dense)
        assert keep


# Evicting policies with real freeing: a compacting request beside a dense one, prefilled, then decoded
# through two compaction events (the first decode step, and ``chunk_size`` tokens later).
EVICTING = {  # kv_min 0: the ratio alone, as on the short CPU prompts
    "snapkv": {"policy": "snapkv", "kv_min": 0, "kv_ratio": 0.25},
    # a window shorter than the prompt's last partial block: some of its tokens go (the tail skip bits)
    "snapkv-short-window": {"policy": "snapkv", "kv_min": 0, "kv_ratio": 0.25, "policy_params": {"window": 3}},
    "pyramidkv": {"policy": "pyramidkv", "kv_min": 0, "kv_ratio": 0.25},
    "adakv": {"policy": "adakv", "kv_min": 0, "kv_ratio": 0.05},  # its region is as wide as a head may take: 8 x 5%
    "h2o": {"policy": "h2o", "kv_budget": 64},
    "streaming-decode": {"policy": "streaming", "kv_budget": 64, "policy_params": {"scope": "decode"}},
    # compression while the prompt is prefilled, chunk by chunk (the prompt's chunks attend through it);
    # the CPU and CUDA runs may keep different tokens where window votes nearly tie, so on CUDA this one
    # is also checked against exactly what it kept (test_prefill_compression_on_the_gpu_path)
    "snapkv-prefill": {"policy": "snapkv", "kv_min": 0, "kv_ratio": 0.25, "prefill_compression": True},
    # per-head patterns and budgets by need, estimated at the prompt's end (its prompt-end hook runs in the
    # prefill step's layer loop); its later events re-rank window heads by recency
    "casakv": {"policy": "casakv", "kv_min": 0, "kv_ratio": 0.25, "policy_params": {"reprofile_interval": 16}},
    "casakv-uniform": {"policy": "casakv", "kv_min": 0, "kv_ratio": 0.25,
                       "policy_params": {"reprofile_interval": 16, "floor": 1.0}},
}
CHUNK = 16


def _decode_sequence(harness, server, device, gpu_path, prompts, steps, prefill_chunk):
    """Per step: (output rows [2, H, D] fp32 on the CPU, rows the kernel did not serve or None)."""
    import casakv_vllm.ops.custom  # noqa: F401
    from casakv_vllm.integration.context import worker_context

    h, hkv, d = SHAPE
    vc = harness.config({**server, "chunk_size": CHUNK}, num_heads=h, num_kv_heads=hkv, head_size=d, device=device,
                        compaction=True)
    builder, impl = harness.backend(vc, BS, device)
    params = harness.requests([(prompts[0], None), (prompts[1], {"casakv_policy": "dense"})])
    table = worker_context().requests
    writer = (lambda k, v, c, s: torch.ops.casakv.reshape_and_cache(k, v, c, s)) if gpu_path else None
    full = harness.batch(impl, [1, 1], [p + steps - 1 for p in prompts], BS, torch.bfloat16, device, seed=11,
                         writer=writer)
    forward = (lambda b: _gpu_forward(harness, builder, impl, b, with_plan=True)) if gpu_path else (
        lambda b: (harness.forward(builder, impl, b), None))
    results, freed = [], set()
    chunks = [(c, min(prompts[0], c + prefill_chunk)) for c in range(0, prompts[0], prefill_chunk)]
    schedule = [([e - c, max(0, prompts[1] - c) if k == len(chunks) - 1 else 0], [c, 0])  # the dense row prefills last
                for k, (c, e) in enumerate(chunks)]
    schedule[-1] = (schedule[-1][0][:1] + [prompts[1]], [schedule[-1][1][0], 0])
    schedule += [([1, 1], [p + i for p in prompts]) for i in range(steps)]
    for i, (q_lens, ctx) in enumerate(schedule):
        if q_lens[1] == 0:  # the dense request has not started yet: a batch of one
            b = harness.at(_first_row(full), q_lens[:1], ctx[:1], seed=100 + i)
        else:
            b = harness.at(full, q_lens, ctx, seed=100 + i)
        out, md = forward(b)
        results.append((out.float().cpu(), md.plan.gpu.torch_rows if md is not None else None))
        if gpu_path and CUDA and i == len(schedule) - 1 and not md.plan.gpu.torch_rows:
            _check_graph_replay(impl, b, md, out)
        state = table.rows[0]
        terms = state.compaction
        tail = terms.settled_tail(b.seq_lens[0]) if terms is not None else None
        if tail is not None:  # the scheduler frees once the step settled: another request's blocks now
            for blk in range(terms.head_end // BS, tail // BS):
                if blk not in freed:
                    freed.add(blk)
                    full.kv_cache[b.cm.block_table_tensor[0, blk].long()] = float("nan")
    assert params and freed, "the compacting request freed no block"
    return results[-steps:], results[:-steps]


def _first_row(batch):
    """``batch`` with only its first request (same cache and block table)."""
    from dataclasses import replace

    cm = batch.cm
    return replace(batch, cm=replace(cm, block_table_tensor=cm.block_table_tensor[:1]), keys=batch.keys[:1],
                   values=batch.values[:1])


def _check_graph_replay(impl, batch, md, eager):
    """A kernel-served decode step of a compacted request, captured in a CUDA graph, replays what eager
    computed (every index it reads was planned by the builder; no host sync in the launch)."""
    out = torch.full_like(batch.query, float("nan"))
    layer = _Layer("model.layers.0.self_attn.attn")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        impl.forward(layer, batch.query, None, None, batch.kv_cache, md, out)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


@pytest.mark.parametrize("policy", [p for p in EVICTING if p != "snapkv-prefill"] if CUDA else
                         ["snapkv-short-window", "h2o", "snapkv-prefill", "casakv"])
def test_compacted_decode_matches_the_torch_path(harness, policy):
    """The CUDA path (keep-sets chosen on the device, compaction, the decode kernel over the live blocks
    with each head's hole and tail skip bits) gives the torch path's outputs at every step, through two
    compaction events, with the freed blocks poisoned after each; a select-once policy's steps between
    events run on the kernel."""
    prompts, steps = ((1005, 333) if CUDA else (205, 90)), CHUNK + 4  # the first ends mid-block
    server = EVICTING[policy]
    prefill_chunk = (256 if CUDA else 48) if server.get("prefill_compression") else prompts[0]
    ours, ours_prefill = _decode_sequence(harness, server, DEVICE, True, prompts, steps, prefill_chunk)
    ref, ref_prefill = _decode_sequence(harness, server, "cpu", False, prompts, steps, prefill_chunk)
    for i, ((got, _), (want, _)) in enumerate(zip(ours_prefill + ours, ref_prefill + ref)):
        err = (got - want).norm() / want.norm()
        assert torch.isfinite(got).all() and err < 1e-2, f"step {i - len(ours_prefill)}: rel err {err:.2e}"
    kernel_steps = [i for i, (_, rows) in enumerate(ours) if 0 not in rows]
    # decode steps that compact (torch rows): the first decode step, unless the last prefill step did
    events = {CHUNK} if server.get("prefill_compression") else {0, CHUNK}
    if policy in ("h2o", "streaming-decode"):  # per-step eviction: torch
        assert not kernel_steps
    else:
        assert set(kernel_steps) == set(range(steps)) - events, kernel_steps


def test_prefill_compression_on_the_gpu_path(harness):
    """Prefill compression through the GPU path (Llama-3-8B shapes on CUDA): chunks after the first event
    run the dense kernel over the live blocks, decode steps the decode kernel over them; each attends to
    exactly what each head kept plus the tail (an fp32 reference over the original keys)."""
    import casakv_vllm.ops.custom  # noqa: F401
    from casakv_vllm.tools.harness import check_prefill_compression

    h, hkv, d = SHAPE
    forward = lambda builder, impl, b: _gpu_forward(harness, builder, impl, b)  # noqa: E731
    prompt = 1200 if CUDA else 300
    assert check_prefill_compression(harness, DEVICE, forward, shape=(h, hkv, d), dtype=torch.bfloat16,
                                     prompt=prompt, chunk=256 if CUDA else 64, tol=2e-2, kv_layout=True) >= 4


def test_a_question_on_the_gpu_path(harness):
    """A question that arrives after its context (``casakv_question_at``) through the GPU path: its prefill
    rows run in torch through the keep-set its context gets served alone, its decode steps read that keep-set
    plus the question (an fp32 reference; ``tools.harness.check_question``)."""
    import casakv_vllm.ops.custom  # noqa: F401
    from casakv_vllm.tools.harness import check_question

    h, hkv, d = SHAPE
    forward = lambda builder, impl, b: _gpu_forward(harness, builder, impl, b)  # noqa: E731
    assert check_question(harness, DEVICE, forward, shape=(h, hkv, d), dtype=torch.bfloat16, tol=2e-2,
                          kv_layout=True) == 4


@pytest.mark.parametrize("alone", [True, False])
def test_sparse_prefill_on_the_gpu_path(harness, alone, monkeypatch):
    """casakv's sparse prefill on the CUDA path: each layer estimates the chunk's patterns from its own
    queries and keys (structured attention: a local head and a stripe head), builds the tile index on the
    device, and the sparse kernel computes the chunk under them, beside a dense decode row or alone; the
    output is masked fp32 attention under exactly the patterns it estimated.  The chunk ends the prompt, so
    the estimate ``across_layers`` notes there serves the chunk too: one estimate per layer call."""
    from dataclasses import replace

    import casakv_vllm.ops.custom  # noqa: F401
    import casakv_vllm.policies.casakv as casakv_policy
    from casakv_vllm.integration.context import worker_context
    from casakv_vllm.tools.bench.estimated import structured_qk

    calls = []
    estimate = casakv_policy.estimate_patterns
    monkeypatch.setattr(casakv_policy, "estimate_patterns", lambda *a, **k: calls.append(1) or estimate(*a, **k))

    h, hkv, d = SHAPE
    prompt = 4096 if CUDA else 384
    server = {"policy": "casakv", "kv_min": 0, "kv_ratio": 0.25,
              "policy_params": {"sparse_prefill": True, "sparse_min_len": 64}}
    vc = harness.config(server, num_heads=h, num_kv_heads=hkv, head_size=d, device=DEVICE, compaction=True,
                        max_model_len=8192)
    builder, impl = harness.backend(vc, BS, DEVICE)
    rows = [(prompt, None)] + ([] if alone else [(100, {"casakv_policy": "dense"})])
    params = harness.requests(rows)
    q, k = structured_qk(prompt, torch.Generator().manual_seed(5), "cpu", shape=SHAPE,
                         kinds=((1.0, 0.0), (0.0, 1.0)) * (hkv // 2))
    q_lens, ctx = ([prompt // 2], [prompt // 2]) if alone else ([prompt // 2, 1], [prompt // 2, 100])
    writer = None if CUDA else (lambda k_, v_, c, s: torch.ops.casakv.reshape_and_cache(k_, v_, c, s))
    batch = harness.batch(impl, q_lens, ctx, BS, torch.bfloat16, DEVICE, seed=7, writer=writer,
                          keys=[k] + [torch.randn(hkv, 101, d)] * (not alone))
    query = batch.query.clone()
    query[:prompt // 2] = q[prompt // 2:].to(query.dtype)
    batch = replace(batch, query=query)
    out, md = _gpu_forward(harness, builder, impl, batch, with_plan=True)
    gp = md.plan.gpu
    assert gp.kind == "sparse" and gp.estimated == [0] and md.plan.rows[0].sparse
    state = worker_context().requests.rows[0]
    seq_len, patterns = state.prefill_patterns[0]
    assert seq_len == prompt and len(calls) == 1
    noted = [n for o in worker_context().observations._prompts.values() for k, n in o.notes.items()
             if k[0] == "casakv" and k[2] == 0]
    assert len(noted) == 1 and noted[0][0].patterns is patterns
    assert not patterns.full.all(), "the structured heads were estimated full: nothing sparse was run"

    def allowed(i, pos, s):
        return pattern_mask(patterns.to("cpu"), 0, pos, s) if i == 0 else None

    ref = harness.reference(batch, impl.scale, allowed)
    err = (out.float().cpu() - ref).norm() / ref.norm()
    assert torch.isfinite(out).all() and err < 1e-2, f"rel err {err:.2e}"
    dense = harness.reference(batch, impl.scale)  # the patterns left something out: the check can tell
    assert (dense[:prompt // 2] - ref[:prompt // 2]).norm() / ref[:prompt // 2].norm() > 1e-2
    assert params

