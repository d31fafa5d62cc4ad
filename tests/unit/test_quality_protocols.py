"""The quality suite's two protocols (question-aware, question-agnostic): where the question starts, which
requests each protocol sends, KV kept per protocol, and the side-by-side report."""

import json
import re

import pytest

from casakv_vllm.tools.quality import report
from casakv_vllm.tools.quality.runner import POLICIES, PROTOCOLS, eval_configs, run_quality
from casakv_vllm.tools.quality.tasks import make_samples, prompt_ids, tokenizer


@pytest.mark.parametrize("task", ["passkey", "multikey", "copy", "fewshot"])
def test_the_question_is_the_prompts_tail_in_tokens(task):
    sample = make_samples(task, 1, seed=3, context_tokens=1024)[0]
    ids, at = prompt_ids(sample)
    tok = tokenizer()
    assert ids == tok(sample.prompt)["input_ids"] and 0 < at < len(ids) and len(ids) - at < 40
    assert tok.decode(ids[at:]) == sample.prompt[sample.question_start:]
    assert tok.decode(ids[:at]) == sample.prompt[:sample.question_start]
    assert prompt_ids(make_samples("longdoc", 1, context_tokens=512)[0])[1] is None


class FakeServer:
    """Answers completions with a fixed text and counts decode KV per policy label as a server would
    (the agnostic requests read a little more: the question is kept whole)."""

    served_name = "demo"

    def __init__(self):
        self.payloads, self.kv = [], {}

    def post(self, path, payload, timeout=None):
        self.payloads.append(payload)
        xargs = payload.get("vllm_xargs") or {}
        if xargs and payload.get("max_tokens", 2) > 1:
            label = f"{xargs['casakv_policy']}/kv_ratio={xargs['casakv_kv_ratio']:g}"
            att, cau = self.kv.get(label, (0.0, 0.0))
            self.kv[label] = (att + (30 if "casakv_question_at" in xargs else 25), cau + 100)
        top = [{" 1": -0.1, " 2": -3.0}] * 4
        return {"choices": [{"text": " 12345", "logprobs": {"tokens": [" 1"] * 4, "top_logprobs": top}}]}

    def metric_values(self, names):
        return {}

    def get_text(self, path):
        return "".join(f'casakv_decode_kv_tokens_{k}_total{{policy="{label}"}} {v[i]}\n'
                       for label, v in self.kv.items() for i, k in enumerate(("attended", "causal")))


def test_each_protocol_sends_its_requests_and_counts_its_kv():
    server = FakeServer()
    configs = eval_configs(["full", "snapkv", "h2o"], ["4x"])
    samples = {"passkey": make_samples("passkey", 2, context_tokens=512),
               "longdoc": make_samples("longdoc", 1, context_tokens=512)}
    records, rows = run_quality(server, samples, configs, 2, protocols=PROTOCOLS)
    passkey = server.payloads[:2 * 6]  # per sample: full, snapkv, h2o aware; the context alone; snapkv, h2o
    assert len(server.payloads) == 2 * 6 + 3  # longdoc has no question: its agnostic cells are its aware ones
    first, _, _, context, *agnostic = passkey[:6]
    assert first["vllm_xargs"]["casakv_policy"] == "h2o" and "cache_salt" not in first  # fills the cache
    ids, at = prompt_ids(samples["passkey"][0])
    assert first["prompt"] == ids and context["prompt"] == ids[:at] and context["max_tokens"] == 1
    assert context["vllm_xargs"] == {"casakv_policy": "h2o", "casakv_kv_ratio": 0.25}  # H2O's attention mass
    assert "cache_salt" in context  # it computes the context from scratch
    assert sorted(p["vllm_xargs"]["casakv_policy"] for p in agnostic) == ["h2o", "snapkv"]
    assert all(p["vllm_xargs"]["casakv_question_at"] == at and "cache_salt" not in p for p in agnostic)
    cells = {(r["policy"], r["protocol"], r["task"]): r for r in records}
    assert cells[("full", "both", "passkey")]["kv_ratio"] == 1.0
    assert cells[("snapkv", "aware", "passkey")]["kv_ratio"] == 0.25
    assert cells[("snapkv", "agnostic", "passkey")]["kv_ratio"] == 0.3
    assert cells[("h2o", "agnostic", "longdoc")]["kv_ratio"] == 0.25  # served by its aware requests
    assert cells[("h2o", "agnostic", "longdoc_kl")]["score"] == 0.0
    assert {r["protocol"] for r in rows} == {"both", "aware", "agnostic"} and len(rows) == 2 * 5 + 5


def _records():
    out = []
    for task, score in (("passkey", 1.0), ("longdoc", 1.0), ("longdoc_kl", 0.0)):
        out.append({"policy": "full", "budget": "full", "protocol": "both", "kv_ratio": 1.0, "task": task,
                    "score": score, "n": 4, "ci_low": score, "ci_high": score})
    for policy in ("snapkv", "casakv"):
        for protocol, drop in (("aware", 0.1), ("agnostic", 0.4)):
            for task, score in (("passkey", 0.9 - drop), ("longdoc", 0.8), ("longdoc_kl", 0.02 + drop / 10)):
                out.append({"policy": policy, "budget": "4x", "protocol": protocol, "kv_ratio": 0.26, "task": task,
                            "score": score, "n": 4, "ci_low": score - 0.1, "ci_high": score + 0.1})
    return out


def test_report_shows_the_protocols_side_by_side(tmp_path):
    recs = _records()
    rows = report.rows(report.validate(recs))
    assert [(r["policy"], r["protocol"]) for r in rows] == [("full", "both"), ("snapkv", "aware"),
                                                            ("snapkv", "agnostic"), ("casakv", "aware"),
                                                            ("casakv", "agnostic")]
    md = report.markdown(recs)
    assert ("| policy | budget | KV kept aware | KV kept agnostic | avg aware | avg agnostic | agnostic - aware "
            "| longdoc_kl aware |") in md
    assert re.search(r"\| snapkv \| 4x \| 0\.260 \| 0\.260 \| \*\*0\.800\*\* \| \*\*0\.650\*\* \| -0\.150 \| 0\.030 \(",
                     md)
    assert "| snapkv | 4x | agnostic | 0.260 | 0.500 (0.40–0.60) |" in md
    assert "| full | full | both | 1.000 |" in md
    obj = report.write_report(recs, md=tmp_path / "q.md", json_path=tmp_path / "q.json", png=tmp_path / "q.png")
    assert obj["protocols"] == ["aware", "agnostic"]
    assert json.loads((tmp_path / "q.json").read_text())["results"][3]["protocol"] == "aware"
    assert (tmp_path / "q.png").read_bytes()[:4] == b"\x89PNG"
    assert "casakv" in POLICIES


def test_agnostic_does_not_take_prefill_compression():
    server = FakeServer()
    configs = eval_configs(["snapkv+prefill"], ["4x"])
    run_quality(server, {"passkey": make_samples("passkey", 1, context_tokens=512)}, configs, 1, protocols=PROTOCOLS)
    assert len(server.payloads) == 1 and "casakv_question_at" not in server.payloads[0]["vllm_xargs"]
    assert "cache_salt" in server.payloads[0]  # a prefill-compressing request prefills its own prompt


def test_a_deadline_keeps_the_same_samples_of_every_task():
    """Rounds of one sample per task: a run cut short by its deadline has as many samples of every task,
    and its partial results are handed out after every round."""
    configs = eval_configs(["full", "snapkv"], ["4x"])
    samples = {t: make_samples(t, 3, context_tokens=512) for t in ("passkey", "copy")}
    seen = []
    records, rows = run_quality(FakeServer(), samples, configs, 1, protocols=PROTOCOLS, deadline=0.0,
                                on_round=lambda recs, rows: seen.append((len(recs), len(rows))))
    assert {r["n"] for r in records} == {1} and {r["task"] for r in records} == {"passkey", "copy"}
    assert seen == [(len(records), len(rows))] and len(rows) == 2 * 3  # full, snapkv aware, snapkv agnostic
    assert all("request_seconds" in r for r in rows)
