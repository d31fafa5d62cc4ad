"""The CPU path through the real builder and impl: vLLM's CPU kernels for dense rows, torch for the
rows a policy restricts; against a plain fp32 reference on random inputs."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from casakv_kernels.patterns import pattern_mask
from casakv_vllm.integration.cpu_kernels import CpuKernels
from casakv_vllm.ops.paged import gather_kv, kv_views, write_kv
from casakv_vllm.policies import build_policy
from casakv_vllm.config import CasakvConfig


@pytest.mark.parametrize("block_size,dtype", [(16, torch.bfloat16), (32, torch.float32), (128, torch.bfloat16)])
def test_torch_writer_matches_vllm_kernel_layout(block_size, dtype):
    kernels = CpuKernels.get(dtype, block_size, 64)
    assert kernels is not None and kernels.isa in ("vec", "vec16", "amx", "neon")
    g = torch.Generator().manual_seed(block_size)
    ours = torch.zeros(5, 2, block_size, 128, dtype=dtype)
    theirs = torch.zeros_like(ours)
    key, value = torch.randn(40, 2, 64, generator=g).to(dtype), torch.randn(40, 2, 64, generator=g).to(dtype)
    slots = torch.randperm(5 * block_size, generator=g)[:40]
    slots[3] = -1  # padding
    write_kv(key, value, ours, slots, kernels.layout)
    kernels.write(key, value, theirs, slots)
    assert torch.equal(ours, theirs)
    blocks = torch.tensor([2, 4, 1])
    k, v = gather_kv(ours, blocks, 2 * block_size + 5, kernels.layout)
    assert k.shape == (2, 2 * block_size + 5, 64)
    n = 2 * block_size + 5
    for i in range(40):  # every written token is where its slot says
        s = int(slots[i])
        if s >= 0 and s // block_size in (2, 4, 1):
            pos = [2, 4, 1].index(s // block_size) * block_size + s % block_size
            if pos < n:
                assert torch.equal(k[:, pos], key[i]) and torch.equal(v[:, pos], value[i])
    if kernels.layout == "vec":
        kv, vv = kv_views(ours)
        assert torch.equal(k[:, block_size + 1], kv[4, :, :, 1]) and torch.equal(v[:, 3], vv[2, :, 3])


def test_no_kernels_for_shapes_vllm_does_not_serve():
    assert CpuKernels.get(torch.bfloat16, 8, 64) is None  # block size not a multiple of 16
    assert CpuKernels.get(torch.bfloat16, 16, 48) is None  # head size vLLM's CPU kernels lack


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**16),
       reqs=st.lists(st.tuples(st.integers(1, 40), st.integers(0, 90)), min_size=1, max_size=4),
       shape=st.sampled_from([(16, 64, torch.bfloat16), (32, 64, torch.float32), (128, 64, torch.bfloat16),
                              (8, 64, torch.float32), (16, 48, torch.bfloat16)]))
def test_dense_rows_match_reference(harness, seed, reqs, shape):
    block_size, head_size, dtype = shape
    vc = harness.config(num_heads=6, num_kv_heads=2, head_size=head_size, dtype=str(dtype).split(".")[1])
    builder, impl = harness.backend(vc, block_size, "cpu")
    harness.requests([])
    q_lens, ctx = [q for q, _ in reqs], [c for _, c in reqs]
    batch = harness.batch(impl, q_lens, ctx, block_size, dtype, "cpu", seed)
    out = harness.forward(builder, impl, batch)
    ref = harness.reference(batch, impl.scale)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    err = (out.float() - ref).norm() / ref.norm()
    assert torch.isfinite(out).all() and err <= tol, f"relative error {err:.2e}"


@pytest.mark.parametrize("block_size,dtype", [(16, torch.float32), (128, torch.bfloat16)])  # vec, amx layouts
def test_mixed_batch_dense_pattern_and_evicting_rows(harness, block_size, dtype):
    """Dense, streaming-pattern and snapkv rows (prefill and decode) in one batch, each against its own
    reference; the dense rows go to vLLM's kernel as one sub-batch."""
    vc = harness.config({"policy": "streaming", "policy_params": {"sink": 3, "window": 10}}, num_heads=6,
                        num_kv_heads=2, head_size=64, dtype=str(dtype).split(".")[1])
    builder, impl = harness.backend(vc, block_size, "cpu")
    # rows: streaming prefill (server policy), dense decode (a request's own policy), snapkv prefill
    # (full attention), snapkv decode (its keep-set)
    snap = {"casakv_policy": "snapkv", "casakv_kv_budget": 16}
    params = harness.requests([(70, None), (40, {"casakv_policy": "dense"}), (90, snap), (50, snap)])
    batch = harness.batch(impl, [30, 1, 90, 1], [40, 40, 0, 50], block_size, dtype, "cpu", seed=5)
    out = harness.forward(builder, impl, batch)
    pattern = build_policy(CasakvConfig(**vc.additional_config["casakv"])).patterns(0, [70], 2, torch.device("cpu"))
    from casakv_vllm.integration.context import worker_context

    keep = worker_context().requests.rows[3].keep[0].visible(51)
    assert keep.sum(1).tolist() == [17, 17]  # 16 prompt tokens + the generated one

    def allowed(i, pos, s):
        return pattern_mask(pattern, 0, pos, s) if i == 0 else keep.unsqueeze(1) if i == 3 else None

    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), harness.reference(batch, impl.scale, allowed), atol=tol, rtol=tol)
    assert params  # the requests stay alive while their state is used


@pytest.mark.parametrize("block_size", [16, 32])
def test_prefill_compression_attends_exactly_what_it_keeps(harness, block_size):
    """Chunks after the first prefill event, and decode steps, attend on vLLM's kernel over the request's
    live blocks to exactly what each head kept plus the uncompacted tail (``tools.harness``)."""
    from casakv_vllm.tools.harness import check_prefill_compression

    assert check_prefill_compression(harness, "cpu", harness.forward, block_size=block_size) >= 7


def test_casakv_notes_each_layers_patterns_at_the_prompts_end(harness):
    """The builder plans casakv's prompt-end hook on the chunk that ends the prompt only; at the first decode
    step the layer selects with the patterns and share noted there (``across_layers``)."""
    from casakv_vllm.integration.context import worker_context

    vc = harness.config({"policy": "dense"}, num_heads=6, num_kv_heads=2, head_size=64, num_layers=1,
                        compaction=True)
    builder, impl = harness.backend(vc, 16, "cpu")
    params = harness.requests([(300, {"casakv_policy": "casakv", "casakv_kv_ratio": 0.25, "casakv_kv_min": 0})])
    full = harness.batch(impl, [1], [300], 16, torch.float32, "cpu", seed=2)
    state = worker_context().requests.rows[0]
    notes = []
    for q_len, ctx in ((200, 0), (100, 200), (1, 300)):
        harness.forward(builder, impl, harness.at(full, [q_len], [ctx], seed=ctx))
        notes.append(sorted(str(k[-1]) for k in worker_context().observations.peek(state.obs_key, 300).notes))
    assert notes[0] == [] and notes[1] == ["0"]  # layer 0's patterns, once the prompt's last chunk ran
    assert len(notes[2]) == 2  # and the layers' shares, computed once when decoding started
    obs = worker_context().observations.peek(state.obs_key, 300)
    share = next(v for k, v in obs.notes.items() if k[2] == "totals")
    from casakv_vllm.tools.harness import kept_positions

    assert int(kept_positions(state.keep[0], 300).sum()) == int(share[0])  # prompt tokens: the layer's share
    assert params
