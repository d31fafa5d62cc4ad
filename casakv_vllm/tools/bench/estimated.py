"""`casakv bench kernels --sections estimated`: a layer's prefill under the patterns the online estimator picks,
estimator included, against dense paged prefill.

The input is synthetic attention with the structure real heads show (no long-context model is on the GPU
box): per KV head, attention sinks, a local decay (a sum of rotating components, so nearby keys score
higher, as RoPE makes them), and a few heavy key columns that every query of the group attends to.  Heads
mix them in different proportions (``HEAD_KINDS``): local heads, stripe heads, mixed heads and one diffuse
head with no structure (which the estimator must leave ``full``).  What the estimator sees is what serving
gives it: the chunk's last 64 queries over every key.

Per N (one prefill chunk of N tokens, one request): ``estimate_ms`` (``observe.estimate.estimate_patterns``
for the layer's 8 KV heads), ``index_ms`` (the tile index of the estimated patterns), ``sparse_ms`` (the
sparse prefill kernel under them), and dense paged prefill of the same cache: casakv's kernel with the
causal mask and vLLM's ``unified_attention`` when staged.  ``speedup`` = dense casakv / (estimate + index +
sparse); ``speedup_vllm`` the same against vLLM's kernel.  ``recall`` is each head's attention recall on
the observed queries (what the estimator promises), averaged; ``density`` the share of causal tiles the
sparse kernel computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from casakv_vllm.tools.bench.gpu_timing import D, DTYPE, HKV, HQ, PAGE, _bench, rel_err

#: per KV head: (local weight, heavy-column weight); (0, 0) is a diffuse head
HEAD_KINDS = ((1.0, 0.0), (0.0, 1.0), (0.8, 0.8), (1.0, 0.3), (0.3, 1.0), (1.0, 0.0), (0.7, 0.7), (0.0, 0.0))
HEAVY_EVERY = 512  # one heavy column per this many keys
SINKS = 4
FREQS = 48  # rotating components of the local decay


@dataclass
class EstimatedResult:
    kind: str  # "estimated"
    seq_len: int
    programs: dict  # pattern program -> KV heads
    recall: float
    density: float
    estimate_ms: float
    index_ms: float
    sparse_ms: float
    dense_ms: float
    vllm_ms: float | None
    speedup: float
    speedup_vllm: float | None
    rel_err: float  # sparse output vs dense, over the query rows (the patterns drop some mass)


def structured_qk(n: int, gen: torch.Generator, device="cuda", shape: tuple[int, int, int] = (HQ, HKV, D),
                  kinds: tuple = HEAD_KINDS) -> tuple[torch.Tensor, torch.Tensor]:
    """``q`` ``[n, Hq, D]`` and ``k`` ``[Hkv, n, D]`` (fp32, ``shape`` = (Hq, Hkv, D)) whose attention has sinks,
    local decay and heavy columns per ``kinds`` (KV head ``h`` is ``kinds[h]``)."""
    hq, hkv, d = shape
    group = hq // hkv
    q = torch.randn(n, hq, d, device=device, generator=gen)
    k = torch.randn(hkv, n, d, device=device, generator=gen)
    pos = torch.arange(n, device=device, dtype=torch.float32)
    freqs = min(FREQS, (d - 1) // 2)  # small heads: fewer components
    omega = math.pi / torch.logspace(math.log10(8), math.log10(1024), freqs, device=device)
    phase = pos.view(n, 1) * omega.view(1, freqs)  # [n, F]
    rot = torch.cat([phase.cos(), phase.sin()], 1) / math.sqrt(freqs)  # [n, 2F]: <rot_i, rot_j> = mean cos
    for h, (local, heavy) in enumerate(kinds[:hkv]):
        basis = torch.linalg.qr(torch.randn(d, 2 * freqs + 1, device=device, generator=gen)).Q  # orthonormal
        comp, u = basis[:, :2 * freqs], basis[:, 2 * freqs]
        # local: <q_i, k_j> gains 16 * local * mean_f cos(w_f (i - j)) (x scale ~ logits of +16 at distance 0)
        loc = (rot @ comp.T) * math.sqrt(16.0 * local * math.sqrt(d))  # [n, D]
        k[h] += loc
        q[:, h * group:(h + 1) * group] += loc.unsqueeze(1)
        sinks = torch.arange(SINKS, device=device)
        heavy_cols = torch.randint(SINKS, n, (max(1, n // HEAVY_EVERY),), device=device, generator=gen)
        cols = torch.cat([sinks, heavy_cols]) if heavy > 0 else sinks  # a local head: sinks only
        boost = math.sqrt(12.0 * math.sqrt(d))  # q.u * k.u * scale = 12 for a heavy column at weight 1
        k[h, cols] += boost * u
        q[:, h * group:(h + 1) * group] += (boost * (heavy if heavy > 0 else 0.5 * local)) * u
    return q, k


def bench_estimated(n: int, gen: torch.Generator, rep_ms: int, vllm_attn=None) -> EstimatedResult:
    from casakv_kernels.sparse_index import build_prefill_index
    from casakv_kernels.sparse_prefill import plan_blocks, sparse_paged_attention
    from casakv_kernels.patterns import PatternBatch
    from casakv_vllm.observe.estimate import PROGRAMS, EstimatorConfig, estimate_patterns
    from casakv_vllm.tools.bench.vllm_triton import make_call

    scale = D ** -0.5
    qf, kf = structured_qk(n, gen)
    per_seq = -(-n // PAGE)
    kv = torch.empty(per_seq + 1, HKV, PAGE, 2 * D, dtype=DTYPE, device="cuda")
    table = (torch.randperm(per_seq, device="cuda", generator=gen) + 1).view(1, per_seq).to(torch.int32)
    kpad = torch.zeros(HKV, per_seq * PAGE, D, device="cuda")
    kpad[:, :n] = kf
    kv[table[0].long(), :, :, :D] = kpad.view(HKV, per_seq, PAGE, D).transpose(0, 1).to(DTYPE)
    kv[table[0].long(), :, :, D:] = torch.randn(HKV, per_seq, PAGE, D, device="cuda",
                                                 generator=gen).transpose(0, 1).to(DTYPE)
    q = qf.to(DTYPE)
    k = kf.to(DTYPE)
    del qf, kf, kpad
    cfg = EstimatorConfig()
    last = q[n - cfg.last_q:].transpose(0, 1)  # [HQ, 64, D]: the chunk's last queries
    est = estimate_patterns(last, k, 0, scale, cfg)
    estimate_ms = _bench(lambda: estimate_patterns(last, k, 0, scale, cfg), rep_ms)
    pat: PatternBatch = est.patterns
    qsl = torch.tensor([0, n], dtype=torch.int32, device="cuda")
    seq_lens = torch.tensor([n], dtype=torch.int32, device="cuda")
    block_q, block_n = plan_blocks(HQ // HKV, D, n, n, DTYPE, pat.sparse_only)
    index = build_prefill_index(pat, qsl, seq_lens, n, n, block_q, block_n)
    index_ms = _bench(lambda: build_prefill_index(pat, qsl, seq_lens, n, n, block_q, block_n), rep_ms)
    causal_tiles = sum(min(-(-(i + 1) * block_q // block_n), -(-n // block_n)) for i in range(-(-n // block_q)))
    density = float(index.tile_count.sum()) / (HKV * causal_tiles)
    out = torch.empty_like(q)
    sparse_ms = _bench(lambda: sparse_paged_attention(q, kv, table, qsl, seq_lens, scale, out, pat, index, n, n),
                       rep_ms)
    dense_pat = PatternBatch.dense(1, HKV, device="cuda")
    bq, bn = plan_blocks(HQ // HKV, D, n, n, DTYPE, False)
    dense_index = build_prefill_index(dense_pat, qsl, seq_lens, n, n, bq, bn)
    ref = torch.empty_like(q)
    dense_ms = _bench(lambda: sparse_paged_attention(q, kv, table, qsl, seq_lens, scale, ref, dense_pat,
                                                     dense_index, n, n), rep_ms)
    vllm_ms = None
    if vllm_attn is not None:
        other = torch.empty_like(q)
        try:
            vllm_ms = _bench(make_call(vllm_attn, q, kv, table, qsl, seq_lens, n, n, scale, other), rep_ms)
        except Exception as err:  # noqa: BLE001  (the peer failing at this shape leaves its cell empty)
            print(f"  vLLM kernel failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
    total = estimate_ms + index_ms + sparse_ms
    programs: dict = {}
    for p in est.program.tolist():
        programs[PROGRAMS[p]] = programs.get(PROGRAMS[p], 0) + 1
    res = EstimatedResult("estimated", n, programs, float(est.recall.mean()), round(density, 4), estimate_ms,
                          index_ms, sparse_ms, dense_ms, vllm_ms, dense_ms / total,
                          vllm_ms / total if vllm_ms else None, rel_err(out, ref))
    del kv, q, k, out, ref, index, dense_index
    torch.cuda.empty_cache()
    return res


def markdown(results: list[dict]) -> list[str]:
    lines = ["", "## Prefill under estimated patterns, estimator included", "",
             "One request, one prefill chunk of N tokens, one layer (Llama-3-8B attention shapes), synthetic "
             "attention with sinks, local decay and heavy columns (`tools/bench/estimated.py`, one diffuse head). "
             "`estimate` = the online estimator over the chunk's last 64 queries; `index` = the tile index of its "
             "patterns; `sparse` = the sparse prefill kernel under them; `dense` = casakv's kernel, causal; "
             "`vLLM` = vLLM's `unified_attention`, causal. `speedup` = dense / (estimate + index + sparse).", "",
             "| N | programs | recall | density | estimate ms | index ms | sparse ms | dense ms | vLLM ms "
             "| speedup vs dense | speedup vs vLLM | rel err |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        progs = ", ".join(f"{k} {v}" for k, v in sorted(r["programs"].items()))
        vl = "-" if r["vllm_ms"] is None else f"{r['vllm_ms']:.2f}"
        sv = "-" if r["speedup_vllm"] is None else f"{r['speedup_vllm']:.2f}"
        lines.append(f"| {r['seq_len']} | {progs} | {r['recall']:.3f} | {r['density']:.3f} | "
                     f"{r['estimate_ms']:.2f} | {r['index_ms']:.2f} | {r['sparse_ms']:.2f} | {r['dense_ms']:.2f} | "
                     f"{vl} | {r['speedup']:.2f} | {sv} | {r['rel_err']:.1e} |")
    return lines
