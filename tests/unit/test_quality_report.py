"""Quality report: Markdown, JSON and PNG from synthetic result records."""

import json

import pytest

from casakv_vllm.tools.quality import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def records():
    out = []
    tasks = ("passkey", "copy", "longdoc")
    for t, s in zip(tasks, (0.95, 0.9, 1.0)):
        out.append({"policy": "full", "budget": "full", "kv_ratio": 1.0, "task": t, "score": s, "n": 20,
                    "ci_low": s - 0.05, "ci_high": min(1.0, s + 0.05)})
    for policy, drop in (("streaming", 0.3), ("snapkv", 0.1)):
        for budget, ratio in (("2x", 0.5), ("4x", 0.25), ("8x", 0.125), ("256", 0.0625)):
            for t in tasks:
                s = max(0.0, 0.95 - drop * (1 / ratio) / 4)
                out.append({"policy": policy, "budget": budget, "kv_ratio": ratio, "task": t, "score": s,
                            "n": 20, "ci_low": max(0.0, s - 0.1), "ci_high": min(1.0, s + 0.1)})
    return out


def test_rows_order_and_averages():
    rows = report.rows(report.validate(records()))
    assert [(r["policy"], r["budget"]) for r in rows[:3]] == [("full", "full"), ("streaming", "2x"),
                                                              ("streaming", "4x")]
    assert rows[0]["avg"] == pytest.approx((0.95 + 0.9 + 1.0) / 3)
    assert rows[1]["kv_ratio"] == pytest.approx(0.5)
    assert len(rows) == 1 + 2 * 4


def test_validate_rejects_missing_keys():
    bad = records()[0]
    del bad["kv_ratio"]
    with pytest.raises(ValueError, match="kv_ratio"):
        report.validate([bad])


def test_write_report(tmp_path):
    md, js, png = tmp_path / "quality.md", tmp_path / "quality.json", tmp_path / "quality.png"
    obj = report.write_report(records(), md=md, json_path=js, png=png, command="casakv eval quality --x",
                              model="/models/demo")
    text = md.read_text()
    assert "casakv eval quality --x" in text and "`/models/demo`" in text
    assert "| policy | budget | KV kept | passkey | copy | longdoc | avg |" in text
    assert "| full | full | 1.000 | 0.950 (0.90–1.00)" in text
    assert "![score vs KV kept](quality.png)" in text
    assert text.count("\n| streaming |") == 4 and text.count("\n| snapkv |") == 4

    data = json.loads(js.read_text())
    assert data == json.loads(json.dumps(obj))
    assert {"command", "versions", "model", "results"} <= set(data)
    assert data["command"] == "casakv eval quality --x" and "python" in data["versions"]
    assert len(data["results"]) == len(records())
    for r in data["results"]:
        assert {"policy", "budget", "kv_ratio", "task", "score", "n", "ci_low", "ci_high"} <= set(r)
        assert isinstance(r["budget"], str)

    blob = png.read_bytes()
    assert len(blob) > 1000 and blob.startswith(PNG_MAGIC)


@pytest.mark.parametrize("backend", ["pillow", "matplotlib"])
def test_plot_backends(tmp_path, backend):
    if backend == "matplotlib":
        pytest.importorskip("matplotlib")
    path = tmp_path / "sub" / "plot.png"
    assert report.write_plot(records(), path, backend=backend) == backend
    blob = path.read_bytes()
    assert blob.startswith(PNG_MAGIC) and len(blob) > 1000
    from PIL import Image

    with Image.open(path) as im:
        assert im.size[0] >= 600 and im.size[1] >= 400
        colors = im.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colors is None or len(colors) > 3  # more than a blank canvas


def test_markdown_without_ci_and_numeric_budget():
    recs = [{"policy": "h2o", "budget": 256, "kv_ratio": 0.1, "task": "passkey", "score": 0.5, "n": 4}]
    text = report.markdown(recs)
    assert "| h2o | 256 | 0.100 | 0.500 | **0.500** |" in text


def test_kl_columns_stay_out_of_the_average():
    recs = [{"policy": "snapkv", "budget": "4x", "kv_ratio": 0.25, "task": "longdoc", "score": 0.8, "n": 4},
            {"policy": "snapkv", "budget": "4x", "kv_ratio": 0.25, "task": "longdoc_kl", "score": 0.3, "n": 4}]
    (row,) = report.rows(report.validate(recs))
    assert row["avg"] == pytest.approx(0.8)
    assert "| snapkv | 4x | 0.250 | 0.800 | 0.300 | **0.800** |" in report.markdown(recs)


def test_prefill_variant_of_a_policy_prefills_its_own_prompt():
    """``snapkv+prefill`` in the quality suite: snapkv with prefill compression, a cache salt of its own
    (a prefix-cache hit would stay dense), the server's metric label of snapkv."""
    from casakv_vllm.tools.quality.runner import _extra, eval_configs

    cfg, = eval_configs(["snapkv+prefill"], ["4x"])
    extra = _extra(cfg)
    assert extra["vllm_xargs"] == {"casakv_policy": "snapkv", "casakv_kv_ratio": 0.25,
                                   "casakv_prefill_compression": True}
    assert len(extra["cache_salt"]) == 32 and extra["cache_salt"] != _extra(cfg)["cache_salt"]
    assert cfg.metric_label == "snapkv/kv_ratio=0.25"
    plain, = eval_configs(["snapkv"], ["4x"])
    assert "cache_salt" not in _extra(plain) and "casakv_prefill_compression" not in plain.xargs()
