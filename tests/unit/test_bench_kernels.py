"""CPU-side pieces of `casakv bench kernels`: staging vLLM's Triton kernel for
the GPU box, loading it from the staged folder, and the Markdown table."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from casakv_vllm.tools.bench import kernels

REPO = Path(__file__).resolve().parents[2]


def _stage_module():
    spec = importlib.util.spec_from_file_location("stage_vllm_kernel", REPO / "scripts" / "stage_vllm_kernel.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_staged_vllm_kernel_is_the_installed_file_and_imports_without_vllm(tmp_path):
    """The staged folder holds vLLM's kernel files byte for byte, and a fresh
    interpreter imports ``unified_attention`` from it with vLLM itself hidden."""
    vllm = pytest.importorskip("vllm")
    dest = _stage_module().stage(tmp_path / "staged")
    src = Path(vllm.__file__).parent
    for rel in ("v1/attention/ops/triton_unified_attention.py", "v1/attention/ops/triton_attention_helpers.py"):
        assert (dest / "vllm" / rel).read_bytes() == (src / rel).read_bytes()
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(dest)!r})\n"
        "from vllm.v1.attention.ops.triton_unified_attention import unified_attention\n"
        "import vllm, inspect\n"
        f"assert vllm.__file__.startswith({str(dest)!r}), vllm.__file__\n"
        "print(sorted(inspect.signature(unified_attention).parameters)[:3])\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "block_table" in res.stdout


def test_load_reports_a_folder_without_staged_files(tmp_path, capsys):
    from casakv_vllm.tools.bench.vllm_triton import load

    assert load(tmp_path) is None
    assert "scripts/stage_vllm_kernel.py" in capsys.readouterr().out


def test_markdown_has_peer_and_copy_columns():
    doc = {
        "gpu": "GPU", "command": "cmd", "torch": "t", "triton": "tr", "copy_TBps": 3.0,
        "results": [
            dict(kind="decode", seq_len=32768, batch=1, mask="select-10%", density=0.1, casakv_ms=0.0116,
                 sdpa_ms=0.052, flex_ms=0.5, bytes_read=13_369_344, hbm_fraction=0.384, rel_err=2e-3,
                 copy_same_ms=0.0065, copy_same_fraction=0.686, read_same_ms=0.0067,
                 read_same_fraction=0.665),
            dict(kind="prefill", seq_len=32768, batch=1, mask="causal", density=1.0, casakv_ms=19.0,
                 sdpa_ms=25.0, flex_ms=19.7, bytes_read=1, hbm_fraction=None, rel_err=1.3e-3,
                 mem_efficient_ms=55.4, vllm_triton_ms=113.0),
        ],
    }
    text = kernels.markdown(doc)
    header = next(line for line in text.splitlines() if line.startswith("| kind"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| decode") or line.startswith("| prefill")]
    decode, prefill = (dict(zip(cols, r)) for r in rows)
    assert decode["copy frac"] == "0.69" and decode["HBM frac"] == "0.38" and decode["vLLM"] == "-"
    assert decode["read frac"] == "0.67" and prefill["read frac"] == "-"
    assert prefill["vLLM"] == "113.000" and prefill["vLLM/casakv"] == "5.95" and prefill["copy frac"] == "-"


def test_markdown_has_the_compacted_decode_table():
    row = dict(kind="decode-compacted", seq_len=131072, batch=16, ratio=0.25, dense_ms=4.0, compacted_ms=1.0,
               speedup=4.0, dense_bytes=8_589_934_592, compacted_bytes=2_147_483_648, dense_hbm_fraction=0.5,
               compacted_hbm_fraction=0.5, rel_err=1e-3, compact_layer_ms=0.2, compact_share=0.0125)
    doc = {"gpu": "GPU", "command": "cmd", "torch": "t", "triton": "tr", "copy_TBps": 4.0, "results": [],
           "compacted": [row]}
    text = kernels.markdown(doc)
    line = next(x for x in text.splitlines() if x.startswith("| 131072"))
    assert "| 4.00 |" in line and "1.250%" in line and "## Decode over a 4x-compacted cache" in text


@pytest.mark.parametrize("policy", ["snapkv", "casakv"])
def test_layer_harness_runs_on_the_cpu(policy):
    """The GPU layer harness's logic (prefill, the compaction event, decode steps through the real builder and
    impl) as a smoke run on the CPU path at a small shape."""
    pytest.importorskip("vllm")
    from casakv_vllm.tools.bench.layer import bench_layer, markdown

    r = bench_layer(300, 2, policy, shape=(4, 2, 64), device="cpu", chunk=64)
    assert r.step_ms > 0 and r.dense_step_ms > 0 and r.event_ms > 0 and r.plan_ms > 0
    assert f"| 300 | 2 | {policy}/kv_ratio=0.25 |" in "\n".join(markdown([r.__dict__]))


def test_reprofile_bench_times_casakv_recall_and_program_update():
    """The compacted section's re-profile cell runs what casakv runs at an event (on the CPU here): random
    keys, a quarter kept, the rest summarised; the timed call re-profiles every head (recall of a random
    query over a quarter of random keys is under 0.95) to ``full``."""
    from casakv_vllm.observe.estimate import FULL
    from casakv_vllm.tools.bench.compacted import HKV, _bench_reprofile

    seen = []

    def timer(fn, rep):
        seen.append(fn())
        return 0.25
    assert _bench_reprofile(2048, 512, torch.Generator().manual_seed(0), device="cpu", timer=timer) == 0.25
    assert seen[0].shape == (HKV,) and bool((seen[0] == FULL).all())
