"""Quality suite: task generators (seeded, offline, sized by the tokenizer) and scoring."""

import math

import pytest

from casakv_vllm.tools.quality import scoring
from casakv_vllm.tools.quality.tasks import RETRIEVAL_TASKS, TASKS, Sample, count_tokens, make_samples


# ---- tasks -------------------------------------------------------------------

@pytest.mark.parametrize("task", TASKS)
def test_samples_are_deterministic_and_sized(task):
    a = make_samples(task, 3, seed=7, context_tokens=2048)
    b = make_samples(task, 3, seed=7, context_tokens=2048)
    assert a == b
    assert [s.id for s in a] == [f"{task}-2048-s7-{i:04d}" for i in range(3)]
    assert len({s.prompt for s in a}) == 3
    for s in a:
        assert isinstance(s, Sample) and s.task == task
        assert abs(count_tokens(s.prompt) - 2048) <= 48, s.meta
        assert s.meta["prompt_tokens"] == count_tokens(s.prompt)
        assert s.meta["context_tokens"] == 2048
        assert 0 < s.max_tokens <= 32
        if task in RETRIEVAL_TASKS:
            assert s.answer and len(s.answer) > 0
        else:
            assert s.answer is None


def test_seed_and_length_change_samples_and_prefixes_are_stable():
    assert make_samples("passkey", 2, seed=0, context_tokens=2048) != make_samples("passkey", 2, seed=1,
                                                                                  context_tokens=2048)
    # sample i does not depend on how many samples are made
    assert make_samples("multikey", 5, 3, 2048)[:2] == make_samples("multikey", 2, 3, 2048)
    long = make_samples("longdoc", 1, 0, 4096)[0]
    assert abs(long.meta["prompt_tokens"] - 4096) <= 8


def test_default_context_and_unknown_task():
    s = make_samples("fewshot", 1, 0, None)[0]
    assert s.meta["context_tokens"] >= 2048
    with pytest.raises(ValueError, match="unknown task"):
        make_samples("nope", 1, 0, 2048)


def test_answers_are_in_the_prompt_where_placed():
    for s in make_samples("passkey", 5, 0, 2048):
        assert s.prompt.count(s.answer) == 2  # "The vault passcode is K. Remember it. K is the ..."
        pos = s.prompt.index(s.answer) / len(s.prompt)
        assert abs(pos - s.meta["depth"]) < 0.1
        assert s.prompt.endswith("The vault passcode is")
    for s in make_samples("multikey", 4, 0, 2048):
        assert s.prompt.count(" is ") >= s.meta["n_keys"]
        assert f"is {s.answer}." in s.prompt
        cue = s.prompt.rsplit("? ", 1)[1]
        assert f"{cue} {s.answer}." in s.prompt  # the question repeats the needle's own frame
    for s in make_samples("copy", 3, 0, 2048):
        qid = s.meta["quote_id"]
        assert f"[QUOTE {qid}] The {s.answer} [/QUOTE]" in s.prompt and s.prompt.endswith(f"[QUOTE {qid}] The")
    for s in make_samples("fewshot", 3, 0, 2048):
        query, tag = s.answer.split()
        assert s.prompt.endswith(f"Input: {query}\nOutput:")
        assert s.prompt.count(f" {tag}") == s.meta["n_shots"]


# ---- scoring: retrieval ----------------------------------------------------------

def test_retrieval_scores():
    assert scoring.number_exact(" 12345. Remember", "12345") == 1.0
    assert scoring.number_exact(" 1234", "12345") == 0.0
    assert scoring.number_exact("no digits", "12345") == 0.0
    assert scoring.digit_accuracy("x 12395", "12345") == pytest.approx(4 / 5)
    assert scoring.digit_accuracy("1234", "12345") == pytest.approx(4 / 5)
    assert scoring.digit_accuracy("123456", "12345") == pytest.approx(5 / 6)
    assert scoring.word_prefix_fraction(" red fox sat by the lake.", "red fox sits by the lake.") == pytest.approx(2 / 6)
    assert scoring.word_prefix_fraction(" Red FOX, sits.  [/QUOTE]", "red fox sits.") == 1.0
    assert scoring.prefix_exact(" bridge blick\n\nThe", "bridge blick") == 1.0
    assert scoring.prefix_exact(" bridge", "bridge blick") == 0.0
    assert scoring.score_retrieval("copy", "a b", "a b c d") == 0.5


# ---- scoring: fidelity -------------------------------------------------------------

def test_greedy_and_token_agreement():
    assert scoring.greedy_prefix_agreement([1, 2, 3, 9], [1, 2, 3, 4], max_tokens=8) == pytest.approx(3 / 8)
    assert scoring.greedy_prefix_agreement([1, 2, 3, 9], [1, 2, 3, 4]) == pytest.approx(3 / 4)
    assert scoring.greedy_prefix_agreement([], []) == 1.0
    assert scoring.token_agreement([1, 2, 9, 4], [1, 2, 3, 4]) == pytest.approx(3 / 4)
    assert scoring.token_agreement([1, 2], [1, 2, 3, 4]) == pytest.approx(2 / 4)
    assert scoring.comparable_positions([1, 2, 3, 9], [1, 2, 3, 4]) == 4
    assert scoring.comparable_positions([1, 9, 3, 4], [1, 2, 3, 4]) == 2
    assert scoring.comparable_positions([1, 2], [1, 2]) == 2


def test_topk_kl_hand_computed():
    ln = math.log
    same = {"a": ln(0.6), "b": ln(0.3)}
    assert scoring.topk_kl(same, dict(same)) == 0.0
    # top-k covering all mass: the exact KL
    p, q = {"a": ln(0.75), "b": ln(0.25)}, {"a": ln(0.5), "b": ln(0.5)}
    assert scoring.topk_kl(p, q) == pytest.approx(0.75 * ln(1.5) + 0.25 * ln(0.5))
    # partial top-k: P = {a .5, b .3, c .1 (tail .2 shared by c and rest), rest .1},
    #                Q = {a .5, c .2, b .15 (tail .3 shared), rest .15}
    p, q = {"a": ln(0.5), "b": ln(0.3)}, {"a": ln(0.5), "c": ln(0.2)}
    want = 0.3 * ln(0.3 / 0.15) + 0.1 * ln(0.1 / 0.2) + 0.1 * ln(0.1 / 0.15)
    assert scoring.topk_kl(p, q) == pytest.approx(want)
    # the cap: a missing token gets at most the side's smallest listed probability
    p, q = {"a": ln(0.5), "b": ln(0.01)}, {"a": ln(0.5), "c": ln(0.2)}
    filled = scoring._fill(p, {"a", "b", "c"})
    assert filled["c"] == pytest.approx(0.01) and filled[None] == pytest.approx(0.49 - 0.01)
    assert sum(filled.values()) == pytest.approx(1.0)


def test_mean_topk_kl_uses_comparable_positions():
    ln = math.log
    same = {"x": ln(0.9)}
    diff = {"x": ln(0.5), "y": ln(0.4)}
    k = scoring.topk_kl(same, diff)
    dense, policy = [same, same, same], [same, diff, diff]
    assert scoring.mean_topk_kl(dense, policy) == pytest.approx(2 * k / 3)
    # tokens split at position 0: only position 0 is comparable
    assert scoring.mean_topk_kl(dense, policy, ["x", "x", "x"], ["y", "x", "x"]) == 0.0
    assert scoring.mean_topk_kl(dense, policy, ["x", "x", "x"], ["x", "y", "x"]) == pytest.approx(k / 2)
    assert scoring.mean_topk_kl([], []) == 0.0


def test_nll_perplexity_and_kl_score():
    assert scoring.tail_nll([None, -1.0, -2.0, -3.0], 2) == pytest.approx(2.5)
    assert scoring.tail_nll([None, -1.0, -2.0, -3.0]) == pytest.approx(2.0)
    assert scoring.perplexity([-ln2 for ln2 in [math.log(2)] * 3]) == pytest.approx(2.0)
    assert scoring.kl_score(0.0) == 1.0 and scoring.kl_score(math.log(2)) == pytest.approx(0.5)


def test_mean_ci():
    assert scoring.mean_ci([0.5]) == (0.5, 0.5, 0.5)
    assert scoring.mean_ci([1, 1, 1]) == (1.0, 1.0, 1.0)
    vals = [1.0] * 80 + [0.0] * 20
    m, lo, hi = scoring.mean_ci(vals)
    assert m == pytest.approx(0.8)
    assert lo < m < hi and 0.68 < lo < 0.76 and 0.84 < hi < 0.92  # normal approx: 0.8 +- 0.078
    assert scoring.mean_ci(vals) == (m, lo, hi)  # fixed seed
    with pytest.raises(ValueError):
        scoring.mean_ci([])
