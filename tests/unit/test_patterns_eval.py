"""``casakv eval patterns``: the fast mask is the kernels' mask, recall and density mean what they say on
attention whose answer is known, the captured queries and keys give the model's own attention, and bad
input gets one line and exit code 2."""

import json
import math
import random

import pytest
import torch

from casakv_kernels.patterns import PatternBatch, pattern_mask
from casakv_kernels.sparse_reference import random_patterns
from casakv_vllm.observe.estimate import EstimatorConfig, estimate_patterns
from casakv_vllm.ops.probs import attention_probs
from casakv_vllm.tools.patterns.measure import (STATIC, Variant, allowed_mask, evaluate_chunk, held_out_rows,
                                                recall_density, static_window)


@pytest.mark.parametrize("seed", range(6))
def test_allowed_mask_is_pattern_mask(seed):
    rng = random.Random(seed)
    seq_lens = [rng.randrange(1, 300) for _ in range(3)]
    p = random_patterns(rng, seq_lens, 3)
    for r, seq in enumerate(seq_lens):
        q_pos = torch.tensor(rng.sample(range(seq + 5), min(seq + 5, 40)))
        assert torch.equal(allowed_mask(p, r, q_pos, seq), pattern_mask(p, r, q_pos, seq)), (seed, r)


def test_allowed_mask_is_pattern_mask_on_estimated_patterns():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(6, 700, 32, generator=g) * 2, torch.randn(2, 700, 32, generator=g) * 2
    for cfg in (EstimatorConfig(threshold=0.5, max_vertical=256, max_slash=64),
                EstimatorConfig(threshold=0.9, max_vertical=64, max_slash=16)):
        est = estimate_patterns(q[:, -64:], k, 300, 32 ** -0.5, cfg, q_chunk=q[:, 300:])
        pos = torch.arange(0, 700, 7)
        assert torch.equal(allowed_mask(est.patterns, 0, pos, 700), pattern_mask(est.patterns, 0, pos, 700))


def test_full_has_recall_and_density_one_and_the_diagonal_its_share():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(4, 600, 16, generator=g), torch.randn(2, 600, 16, generator=g)
    pos = torch.arange(100, 600, 3)
    diag = PatternBatch.empty(1, 2)
    rec, den = recall_density(q[:, pos], k, pos, 0.25, [PatternBatch.dense(1, 2), diag])
    assert torch.allclose(rec[0], torch.ones(2)) and torch.allclose(den[0], torch.ones(2))
    probs = attention_probs(q[:, pos], k, pos, 0.25)  # [4, n, S]
    own = probs[:, torch.arange(len(pos)), pos].view(2, 2, -1).mean(1).mean(1)  # each query's weight on itself
    assert torch.allclose(rec[1], own, atol=1e-5)
    assert torch.allclose(den[1], torch.full((2,), len(pos) / float((pos + 1).sum())))


def test_recall_and_density_of_known_attention():
    """KV head 0's group: query head 0 attends uniformly (zero queries), query head 1 puts (almost) all its
    attention on column 3.  Under sinks 8 + window 32, a query at p keeps min(p + 1, 40) / (p + 1) of
    head 0's attention and all of head 1's (column 3 is a sink): recall is the group's mean, density the
    kept share of the causal area."""
    seq, d = 400, 8
    q = torch.zeros(2, seq, d)
    k = torch.zeros(1, seq, d)
    q[1, :, 0] = 1.0
    k[0, 3, 0] = 60.0
    pos = torch.arange(10, seq)
    pattern = PatternBatch.local(1, 1, sink=8, window=32)
    rec, den = recall_density(q[:, pos], k, pos, 1.0, [pattern, PatternBatch.local(1, 1, sink=0, window=32)])
    kept = torch.clamp(pos + 1, max=40).double() / (pos + 1)
    assert math.isclose(float(rec[0, 0]), float((kept + 1).mean() / 2), rel_tol=1e-5)
    assert math.isclose(float(den[0, 0]), float(torch.clamp(pos + 1, max=40).sum() / (pos + 1).sum()), rel_tol=1e-6)
    # without the sink, head 1's column leaves the window once p >= 35: only head 0's share remains there
    expect = (torch.clamp(pos + 1, max=32).double() / (pos + 1) + (pos < 35).double()) / 2
    assert math.isclose(float(rec[1, 0]), float(expect.mean()), rel_tol=1e-4)


def test_held_out_rows_leave_the_estimators_queries_out():
    assert held_out_rows(0, 1000, 64, 0).tolist() == list(range(936))
    some = held_out_rows(200, 1000, 64, 50)
    assert len(some) == 50 and int(some[0]) == 200 and int(some[-1]) == 935
    with pytest.raises(ValueError):
        held_out_rows(0, 64, 64, 0)
    rows = torch.arange(0, 4000)
    w = static_window(rows, 64, 0.3)
    dens = lambda w: float(torch.clamp(rows + 1, max=64 + w).sum() / (rows + 1).sum())  # noqa: E731
    assert dens(w) <= 0.3 < dens(w + 1)


def test_held_out_recall_is_not_the_estimators_own():
    """The chunk's last 64 queries look only at column 5; the earlier ones attend uniformly.  The estimator
    fits column stripes to what it saw (its own recall reaches the threshold) but those miss the held-out
    queries' attention; a static window does what the formula says."""
    seq, d = 2048, 8
    q = torch.zeros(2, seq, d)
    k = torch.zeros(1, seq, d)
    q[:, -64:, 0] = 1.0
    k[0, 5, 0] = 60.0
    res = evaluate_chunk(q, k, 0, seq, 1.0, [Variant(0.9, block=False)], rows=0, static_density=0.3, check=True)
    est = res["t=0.9"]
    assert est.program == ["vertical"] and est.est_recall[0] >= 0.9
    assert est.recall[0] < 0.05 and est.density[0] < 0.01
    static = res[STATIC]
    pos = torch.arange(seq - 64)
    w = static_window(pos, EstimatorConfig().sink, 0.3)
    expect = (torch.clamp(pos + 1, max=64 + w).double() / (pos + 1)).mean()
    assert math.isclose(static.recall[0], float(expect), rel_tol=1e-4) and static.density[0] <= 0.3


@pytest.fixture(scope="module")
def demo_model():
    from casakv_vllm.tools.demo_model import ensure_demo_model

    return str(ensure_demo_model())


def test_captured_queries_and_keys_give_the_models_attention(demo_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from casakv_vllm.tools.quality.search_heads import capture_qk

    tok = AutoTokenizer.from_pretrained(demo_model)
    model = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    ids = tok("The vault passcode is 31337. Remember it, because I will ask for the vault passcode later on.",
              return_tensors="pt").input_ids
    captured = capture_qk(model, ids)
    with torch.no_grad():
        attentions = model(input_ids=ids, output_attentions=True).attentions
    scale = model.model.layers[0].self_attn.scaling
    assert len(captured) == len(attentions) == model.config.num_hidden_layers
    for layer, ((q, k), ref) in enumerate(zip(captured, attentions)):
        ours = attention_probs(q, k, 0, scale)
        assert torch.allclose(ours, ref[0], atol=2e-5), (layer, float((ours - ref[0]).abs().max()))


def test_a_tiny_run_writes_its_report(demo_model, tmp_path, capsys):
    from casakv_vllm.tools.cli import main

    out = tmp_path / "p.json"
    rc = main(["eval", "patterns", "--model", demo_model, "--prompts", "1", "--context", "256", "--sweep", "",
               "--rows", "64", "--json", str(out), "--md", str(tmp_path / "p.md"), "--plot", str(tmp_path / "p.png")])
    assert rc == 0
    obj = json.loads(out.read_text())
    names = {s["variant"] for s in obj["summaries"]}
    assert names == {"t=0.95", "t=0.95 +block", STATIC}
    fields = obj["head_fields"]
    rows = [dict(zip(fields, r)) for r in obj["heads"]]
    assert len(rows) == 3 * 30 * 3  # variants x layers x KV heads
    assert all(r["recall"] == 1.0 and r["density"] == 1.0 for r in rows if r["program"] == "full")
    assert all(0 < r["density"] <= 1 and 0 < r["recall"] <= 1 for r in rows)
    assert obj["prompts"][0]["seed"] == 5000 and obj["prompts"][0]["tokens"] <= 256
    assert "Target (held-out recall" in (tmp_path / "p.md").read_text()
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert "Target" in capsys.readouterr().out


@pytest.mark.parametrize("args", [["--prompts", "0"], ["--prompts", "x"], ["--threshold", "1.5"],
                                  ["--sweep", "0.9,abc"], ["--chunk", "10"], ["--rows", "-1"],
                                  ["--context", "100000"], ["--context", "512", "--chunk", "1024"]])
def test_bad_input_gets_one_line_and_exit_code_2(args, demo_model, capsys):
    from casakv_vllm.tools.cli import main

    try:
        rc = main(["eval", "patterns", "--model", demo_model, *args])
    except SystemExit as stop:
        rc = stop.code
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("casakv eval patterns: "), err
    assert "Traceback" not in err


def test_a_folder_without_a_model_is_bad_input(tmp_path, capsys):
    from casakv_vllm.tools.cli import main

    assert main(["eval", "patterns", "--model", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
