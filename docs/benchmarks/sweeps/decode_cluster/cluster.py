"""Cluster decode experiment (cluster_decode.cu): the splits of each
(request, KV head) are the CTAs of one thread-block cluster and merge through
distributed shared memory, in one launch.  Checks it against the fp32
reference (NaN-poisoned unselected slots), then times it next to the tree's
Triton decode, the read-only launch and the same-bytes copy, graph-timed like
the benchmark.  Run on the GPU box from the repository root:
    python docs/benchmarks/sweeps/decode_cluster/cluster.py [--json PATH] [--quick]
(builds the experiment with nvcc into /tmp; no install.)  The Triton decode
with evict_first K/V loads is timed too when ../decode-evict-first.patch is
applied.  Runs, logs and what they showed: ../README.md, "Decode: one launch,
the splits merged inside a thread-block cluster"."""

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[3]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests" / "kernels"))
sys.path.insert(0, str(HERE.parent))
import kernel_sweep as ks  # noqa: E402  (the sweep's inputs and graph timer, from this checkout)
from nvcc_build import build  # noqa: E402

from casakv_vllm.bench.kernels import _copy_bandwidth  # noqa: E402

LOG2E = 1.4426950408889634
ONE_PER_SM = 120 * 1024  # a shared-memory floor that leaves room for one CTA per SM
LOADS_ONLY = 1
BULK = 2
PUSH = 4  # push the partials into their owners' shared memory (else: every CTA pulls them)
HINTS = 8  # L2 hints: K/V pages evict_first, page ids evict_last
WARM = 16  # diagnostic: the CTA combine runs once more before the real one


def load():
    torch.ops.load_library(build(str(HERE / "cluster_decode.cu"), "/tmp/casakv_cl.so"))
    return torch.ops.casakv_cl


def check(cl, rows):
    """Random shapes and selections against the fp32 reference; every
    unselected or unowned cache slot is NaN, the outputs start as NaN."""
    from test_sparse_decode import _make_case, sparse_paged_decode_ref
    kinds = ["all", "single", "last", "random", "first_last", "empty"]
    cases = [  # seq_lens, hkv, group, d, bs, dtype
        ([1000, 37, 4097], 8, 4, 128, 16, torch.bfloat16),
        ([517, 2049], 2, 8, 128, 32, torch.float16),
        ([300, 1, 1600], 4, 1, 64, 16, torch.bfloat16),
        ([5000], 8, 4, 128, 16, torch.bfloat16),
        ([77, 900, 16, 2500], 3, 3, 64, 64, torch.float16),
    ]
    worst = 0.0
    for i, (lens, hkv, group, d, bs, dt) in enumerate(cases):
        case = _make_case(lens, hkv, group, d, bs, dt, "contiguous", kinds, seed=i, poison_unselected=True)
        ref, ref_lse = sparse_paged_decode_ref(**case, return_lse=True)
        phys = ks.physical_selection(case["sel_blocks"], case["block_table"])
        q = case["query"]
        for cluster, stages, warps, mode in itertools.product((1, 3, 8, 16), (2, 4), (4, 8),
                                                                         (0, BULK, PUSH, PUSH | BULK)):
            if stages * warps > 16:  # over the shared memory of one CTA
                continue
            out = torch.full_like(q, float("nan"))
            lse = torch.full(q.shape[:2], float("nan"), device="cuda")
            cl.cluster_decode(q, case["kv_cache"], case["block_table"], case["seq_lens"], phys, case["sel_count"],
                              case["scale"] * LOG2E, cluster, stages, warps, 0, out, lse, None, mode)
            torch.cuda.synchronize()
            ok = bool(torch.isfinite(out).all())
            err = ks.rel(out, ref) if ok else float("nan")
            fin = torch.isfinite(ref_lse)
            same_inf = bool((torch.isneginf(lse) == ~fin).all())
            lse_err = float((lse[fin] - ref_lse[fin]).abs().max()) if bool(fin.any()) else 0.0
            good = ok and err <= 1e-2 and same_inf and lse_err <= 1e-3
            worst = max(worst, err if ok else float("inf"))
            rows.append(dict(kind="check", case=i, cluster=cluster, stages=stages, warps=warps, mode=mode,
                             rel_err=err, lse_max_abs=lse_err, ok=good))
            if not good:
                print(f"CHECK FAILED case {i} C={cluster} st={stages} w={warps} mode={mode}: finite={ok} "
                      f"rel={err:.2e} lse={lse_err:.2e} lse_ok={lse_ok}", flush=True)
    n = sum(r["kind"] == "check" for r in rows)
    bad = sum(r["kind"] == "check" and not r["ok"] for r in rows)
    print(f"checks: {n - bad}/{n} passed, worst rel err {worst:.2e}", flush=True)
    return bad == 0


STAMPS = 11  # cluster_decode.cu's kStamps


def phases(tl):
    """Per-CTA phases (us) from the kernel's globaltimer stamps: medians over
    the CTAs that had chunks, plus the spreads of starts and ends."""
    t = tl.double().cpu()
    ok = t[:, 2] > 0
    us = 1e-3

    def med(a, b):
        return statistics.median((t[ok, b] - t[ok, a]).tolist()) * us

    return dict(to_first=med(0, 2), loop_warp0=med(2, 3), other_warps=med(3, 4), store_partials=med(4, 5),
                warm_pass=med(5, 6), cta_combine=med(6, 7), cluster_barrier1=med(7, 8), merge=med(8, 9),
                cluster_barrier2=med(9, 10), end_spread=float(t[:, 10].max() - t[:, 10].min()) * us,
                start_spread=float(t[:, 0].max() - t[:, 0].min()) * us,
                total=float(t[:, 10].max() - t[:, 0].min()) * us)


def sweep(cl, rows, copy_bps, n, batch, configs, gen, ceilings=True):
    kv, table, qq, sl, nb, ws = ks.decode_inputs(gen, n, batch)
    logical = ks.decode_selections(batch, nb, 0.1, gen)
    sels = [(ks.physical_selection(s, table), c) for s, c in logical]
    keep = int(logical[0][1][0, 0])
    byts = batch * ks.HKV * keep * ks.PAGE * 2 * ks.D * 2
    scale = ks.D ** -0.5
    out = torch.empty_like(qq)
    ref = ks.sparse_paged_decode_ref(qq[:2], kv, table[:2], sl[:2], logical[0][0][:2], logical[0][1][:2], scale)

    def frac(ms):
        return byts / (ms / 1e3) / copy_bps

    head = dict(kind="decode", n=n, batch=batch, bytes=byts)
    tri = ks.bench_graph([lambda x=x, c=c: ks.sparse_paged_decode(qq, kv, table, sl, x, c, scale, out, workspace=ws,
                                                                  sel_physical=True) for x, c in sels])
    rows.append(dict(head, impl="triton (tree)", us=tri * 1e3, hbm=frac(tri)))
    from casakv_vllm.triton_kernels import sparse_decode as sd
    if hasattr(sd, "_KV_EVICT"):  # only with ../decode-evict-first.patch applied (not in the tree)
        sd._KV_EVICT = "evict_first"
        tri_ef = ks.bench_graph([lambda x=x, c=c: ks.sparse_paged_decode(
            qq, kv, table, sl, x, c, scale, out, workspace=ws, sel_physical=True) for x, c in sels])
        out.fill_(float("nan"))
        ks.sparse_paged_decode(qq, kv, table, sl, sels[0][0], sels[0][1], scale, out, workspace=ws, sel_physical=True)
        sd._KV_EVICT = ""
        err = ks.rel(out[:2], ref)
        rows.append(dict(head, impl="triton (tree), K/V evict_first", us=tri_ef * 1e3, hbm=frac(tri_ef), rel_err=err))
        print(f"  triton, K/V loads evict_first: {tri_ef * 1e3:.1f} us (hbm {frac(tri_ef):.2f}) err {err:.1e}", flush=True)
    line = f"== N={n} B={batch} 10%: {keep} pages per KV head, {byts / 1e6:.1f} MB; tree's Triton {tri * 1e3:.1f} us " \
           f"(hbm {frac(tri):.2f})"
    if ceilings:
        rd, cp = ks.read_same_bytes(byts), ks.copy_same_bytes(byts)
        rows.append(dict(head, impl="read-only launch", us=rd * 1e3, hbm=frac(rd)))
        rows.append(dict(head, impl="same-bytes copy", us=cp * 1e3, hbm=frac(cp)))
        line += f"; read-only {rd * 1e3:.1f} us ({frac(rd):.2f}); copy {cp * 1e3:.1f} us ({frac(cp):.2f})"
    print(line, flush=True)
    best = None
    for cluster, stages, warps, mode, floor in configs:
        def run(x, c, tl=None, m=mode):
            cl.cluster_decode(qq, kv, table, sl, x, c, scale * LOG2E, cluster, stages, warps, floor, out, None, tl, m)
        try:
            ms = ks.bench_graph([lambda x=x, c=c: run(x, c) for x, c in sels])
        except RuntimeError as err:
            print(f"C={cluster} st={stages} w={warps} mode={mode} floor={floor}: failed {str(err)[:120]}", flush=True)
            continue
        out.fill_(float("nan"))
        run(*sels[0])
        err = ks.rel(out[:2], ref)
        name = f"cluster C={cluster} st={stages} w={warps} {'bulk' if mode & BULK else 'cp.async'}" \
               f"{' push' if mode & PUSH else ' pull'}{' hints' if mode & HINTS else ''}" \
               f"{' warm' if mode & WARM else ''}{' 1/SM' if floor else ''}"
        rows.append(dict(head, impl=name, cluster=cluster, stages=stages, warps=warps, mode=mode, floor=floor,
                         us=ms * 1e3, hbm=frac(ms), rel_err=err))
        line = f"  {name}: {ms * 1e3:.1f} us (hbm {frac(ms):.2f}) err {err:.1e}"
        if batch == 1:  # per-CTA phases of single launches, medians over the selections
            tl = torch.zeros(cluster * ks.HKV * batch, STAMPS, dtype=torch.int64, device="cuda")
            ph = []
            for x, c in sels:
                torch.cuda.synchronize()
                run(x, c, tl)
                torch.cuda.synchronize()
                ph.append(phases(tl))
            med = {k: statistics.median(p[k] for p in ph) for k in ph[0]}
            rows.append(dict(head, impl=name + " timeline", **med))
            line += "\n    timeline (us): " + ", ".join(f"{k} {v:.2f}" for k, v in med.items())
        print(line, flush=True)
        if not mode & WARM and (best is None or ms < best[0]):
            best = (ms, cluster, stages, warps, mode, floor, name)
    if best is not None and batch == 1:
        ms, cluster, stages, warps, mode, floor, name = best
        lo = ks.bench_graph([lambda x=x, c=c: cl.cluster_decode(
            qq, kv, table, sl, x, c, scale * LOG2E, cluster, stages, warps, floor, out, None, None, mode | LOADS_ONLY)
            for x, c in sels])
        rows.append(dict(head, impl=name + " loads only", us=lo * 1e3, hbm=frac(lo)))
        print(f"  best {name}: loads only {lo * 1e3:.1f} us ({frac(lo):.2f})", flush=True)
    del kv, ws
    torch.cuda.empty_cache()
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    cl = load()
    print(torch.cuda.get_device_name(), flush=True)
    rows = []

    def occupancy(c, st, w, mode, fl):
        n = int(cl.max_active_clusters(c, st, w, fl, 128, mode))
        rows.append(dict(kind="occupancy", cluster=c, stages=st, warps=w, mode=mode, floor=fl, max_active_clusters=n))
        return n

    line = [f"C={c}: {occupancy(c, 2, 4, 0, ONE_PER_SM)} (1/SM), {occupancy(c, 2, 4, 0, 0)} (2 st x 4 w, no floor)"
            for c in range(4, 17)]
    print("max active clusters: " + "; ".join(line), flush=True)
    ok = check(cl, rows)
    copy_bps = _copy_bandwidth()
    print(f"copy bandwidth {copy_bps / 1e12:.2f} TB/s", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    # the first sweep's (decode-cluster-h100.log) best configs; all 8 clusters of a B=1 call fit at once
    configs = [(8, 2, 8, 0, 0), (8, 2, 8, PUSH, 0), (8, 2, 8, PUSH | HINTS, 0), (8, 2, 8, PUSH | BULK | HINTS, 0),
               (8, 2, 8, PUSH | HINTS | WARM, 0), (8, 2, 4, PUSH | HINTS, 0), (16, 2, 4, PUSH | HINTS, 0)]
    configs = [cfg for cfg in configs if occupancy(*cfg) >= 8]
    if args.quick:
        configs = configs[:8]
    best = {}
    for n in (131072, 32768):
        best[n] = sweep(cl, rows, copy_bps, n, 1, configs, gen)
    top = sorted({b[1:6] for b in best.values() if b is not None})
    for n in (32768, 131072):
        sweep(cl, rows, copy_bps, n, 16, top, gen, ceilings=False)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(copy_TBps=copy_bps / 1e12, checks_ok=ok, rows=rows), indent=1))
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
