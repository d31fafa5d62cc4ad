"""The question-agnostic protocol through the real server (``vllm_xargs`` ``casakv_question_at``): the
context is compressed as if it were the whole prompt, the question is answered from that compressed
cache, the blocks the rule names are freed and the question's blocks never come from the prefix cache."""

import json
import urllib.error
import uuid

import pytest

from casakv_vllm.compress.rule import CompactionTerms
from casakv_vllm.tools.greedy import completion_steps, divergence

pytestmark = pytest.mark.e2e

LAYERS, KV_HEADS, BUDGET, QUESTION = 30, 3, 64, 20
SNAP = {"casakv_policy": "snapkv", "casakv_kv_budget": BUDGET}
LABEL = f"snapkv/kv_budget={BUDGET}"
SERIES = ["casakv_kv_blocks_freed_total", f'casakv_decode_kv_tokens_attended_total{{policy="{LABEL}"}}',
          "vllm:prefix_cache_hits_total"]


def _metrics(server) -> dict:
    """``SERIES`` summed over their label sets (a name with labels: that series only)."""
    server.metric_values(["casakv_forward_calls_total"])  # the workers' last flush
    out = dict.fromkeys(SERIES, 0.0)
    for line in server.get_text("/metrics").splitlines():
        key = line.split(" ")[0]
        for name in SERIES:
            if key == name or ("{" not in name and key.split("{")[0] == name):
                out[name] += float(line.split()[-1])
    return out


def _ask(server, ids, xargs, max_tokens, salt=None):
    payload = {"model": "demo", "prompt": ids, "max_tokens": max_tokens, "temperature": 0.0, "logprobs": 3,
               "ignore_eos": True, "return_tokens_as_token_ids": True, "vllm_xargs": xargs}
    if salt:
        payload["cache_salt"] = salt
    return completion_steps(server.post("/v1/completions", payload))


def _delta(after, before):
    return {k: after[k] - before[k] for k in after}


def test_a_question_is_answered_from_its_contexts_own_keep_set(casakv_server, prompts):
    """The context served alone generates t1, t2, ...; the context followed by the question t1..t20 under
    the agnostic protocol continues exactly as the context alone did from t21 on: its keep-set is the
    context's own (the question did not choose it), the question read only that keep-set and is kept
    whole (each decode step reads the budget, the 20 question tokens and the generated ones), and both
    free the blocks the rule names.  A later identical request reads no question block from the prefix
    cache (an unsalted full-attention request cached them)."""
    _, long_doc = prompts
    context = casakv_server.post("/tokenize", {"model": "demo", "prompt": "Agnostic. " + long_doc})["tokens"]
    q = len(context)
    m0 = _metrics(casakv_server)
    alone = _ask(casakv_server, context, SNAP, QUESTION + 6, salt=uuid.uuid4().hex)
    m1 = _metrics(casakv_server)
    question = [int(token.removeprefix("token_id:")) for token, _ in alone[:QUESTION]]
    prompt = context + question
    xargs = {**SNAP, "casakv_question_at": q}
    asked = _ask(casakv_server, prompt, xargs, 6, salt=uuid.uuid4().hex)
    m2 = _metrics(casakv_server)
    d = divergence(asked, alone[QUESTION:])
    assert d is None or d.is_near_tie(0.5), d
    freed = len(CompactionTerms(16, len(prompt), 0, BUDGET, context=q).freed_blocks)
    assert freed == len(CompactionTerms(16, q, 0, BUDGET).freed_blocks) > 50
    first, second = _delta(m1, m0), _delta(m2, m1)
    assert first["casakv_kv_blocks_freed_total"] == second["casakv_kv_blocks_freed_total"] == freed
    attended = SERIES[1]
    assert second[attended] == LAYERS * KV_HEADS * sum(BUDGET + QUESTION + j for j in range(1, 6))

    _ask(casakv_server, prompt, None, 1)  # full attention caches every full block of the prompt
    m3 = _metrics(casakv_server)
    again = _ask(casakv_server, prompt, xargs, 6)
    hits = _delta(_metrics(casakv_server), m3)["vllm:prefix_cache_hits_total"]
    assert hits == q // 16 * 16 < (len(prompt) - 1) // 16 * 16  # the context's full blocks, no question block
    d = divergence(again, asked)
    assert d is None or d.is_near_tie(0.5), d


def test_a_budget_above_the_context_is_full_attention(casakv_server, prompts):
    """Keeping every context token under the agnostic protocol is full attention: the question reads the
    whole context, so the greedy answer is dense attention's."""
    _, long_doc = prompts
    ids = casakv_server.post("/tokenize", {"model": "demo", "prompt": long_doc})["tokens"]
    context = casakv_server.post("/tokenize", {"model": "demo", "prompt": long_doc.split(" Question:")[0]})["tokens"]
    at = len(context)
    assert ids[:at] == context and len(ids) - at > 10
    dense = _ask(casakv_server, ids, None, 12)
    kept = _ask(casakv_server, ids, {"casakv_policy": "snapkv", "casakv_kv_budget": 4096, "casakv_question_at": at},
                12)
    d = divergence(kept, dense)
    assert d is None or d.is_near_tie(0.5), d


@pytest.mark.parametrize("value, expected", [
    (-1, "casakv_question_at=-1: must be an int from 1 to the prompt length"),
    (0, "casakv_question_at=0"),
    (10 ** 6, "from 1 to the prompt length ("),
    ("12", 'casakv_question_at="12"'),
    (2.5, "casakv_question_at=2.5"),
])
def test_a_bad_question_position_is_an_http_400_with_one_line(casakv_server, value, expected):
    try:
        casakv_server.post("/v1/completions", {"model": "demo", "prompt": "Hello there", "max_tokens": 2,
                                               "vllm_xargs": {**SNAP, "casakv_question_at": value}})
        code, body = 200, ""
    except urllib.error.HTTPError as err:
        code, body = err.code, err.read().decode()
    assert code == 400, body
    message = json.loads(body)["error"]["message"]
    assert expected in message and "\n" not in message and "Traceback" not in message
