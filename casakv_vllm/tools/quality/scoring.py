"""Scores in [0, 1] for the quality tasks; pure functions, no I/O.

Retrieval (answer known):

- ``passkey``, ``multikey``: ``number_exact`` -- 1 if the first run of digits
  in the generation equals the answer, else 0.  ``digit_accuracy`` (share of
  answer digits right, position by position) is the partial-credit variant.
- ``copy``: ``word_prefix_fraction`` -- the number of leading answer words
  reproduced in order, divided by the answer's word count (case and
  punctuation ignored).  A verbatim copy scores 1; a copy that goes wrong at
  the 4th of 12 words scores 0.25.
- ``fewshot``: ``prefix_exact`` -- 1 if the generation starts with the answer
  words (case and punctuation ignored), else 0.

Fidelity (``longdoc``; the reference is the dense, full-attention run of the
same prompt, both greedy):

- ``greedy_prefix_agreement``: common prefix of the two token sequences
  divided by ``max_tokens`` (the dense length by default).
- ``token_agreement``: share of the dense positions whose token the policy
  reproduced at the same position (counts re-synchronised stretches too).
- ``topk_kl`` / ``mean_topk_kl``: next-token KL(dense || policy) estimated from
  the top-k logprobs each side returns (vLLM ``logprobs: k``); see ``topk_kl``.
- ``tail_nll`` / perplexity: mean negative logprob of given tokens (e.g. the
  tail of a document from vLLM ``prompt_logprobs``).

``mean_ci`` gives a mean with a 95% percentile-bootstrap interval (fixed seed).
"""

from __future__ import annotations

import math
import random
import re
from typing import Hashable, Mapping, Sequence

# ---- retrieval -------------------------------------------------------------------

def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def first_number(text: str) -> str | None:
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


def number_exact(pred: str, answer: str) -> float:
    return float(first_number(pred) == answer)


def digit_accuracy(pred: str, answer: str) -> float:
    """Share of answer digits matched position by position by the first
    digit run of ``pred`` (a missing or shorter run counts as wrong digits)."""
    got = first_number(pred) or ""
    if not answer:
        return 0.0
    return sum(a == b for a, b in zip(answer, got)) / max(len(answer), len(got))


def word_prefix_fraction(pred: str, answer: str) -> float:
    want, got = _words(answer), _words(pred)
    if not want:
        return 0.0
    n = 0
    while n < min(len(want), len(got)) and want[n] == got[n]:
        n += 1
    return n / len(want)


def prefix_exact(pred: str, answer: str) -> float:
    return float(word_prefix_fraction(pred, answer) == 1.0)


SCORERS = {"passkey": number_exact, "multikey": number_exact, "copy": word_prefix_fraction,
           "fewshot": prefix_exact}


def score_retrieval(task: str, pred: str, answer: str) -> float:
    return SCORERS[task](pred, answer)


# ---- fidelity to full attention ------------------------------------------------------

def common_prefix_len(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def greedy_prefix_agreement(policy: Sequence[Hashable], dense: Sequence[Hashable],
                            max_tokens: int | None = None) -> float:
    """len(common prefix) / max_tokens (default: len(dense)); 1.0 if both are empty."""
    denom = max_tokens if max_tokens is not None else len(dense)
    return 1.0 if denom == 0 else min(1.0, common_prefix_len(policy, dense) / denom)


def token_agreement(policy: Sequence[Hashable], dense: Sequence[Hashable]) -> float:
    """Share of dense positions i with policy[i] == dense[i] (1.0 if dense is empty)."""
    if not dense:
        return 1.0
    return sum(1 for p, d in zip(policy, dense) if p == d) / len(dense)


def _fill(top: Mapping[Hashable, float], union: set) -> dict:
    """Probabilities of one side over ``union`` plus a rest bucket (key None).

    The side's tail mass ``1 - sum(top-k probs)`` is shared equally by the
    union tokens missing from its top-k and the rest bucket, each share capped
    at the side's smallest top-k probability (a missing token cannot be more
    likely than the ones listed); whatever the caps hold back stays in rest."""
    probs = {t: math.exp(lp) for t, lp in top.items()}
    tail = max(0.0, 1.0 - sum(probs.values()))
    missing = [t for t in union if t not in probs]
    share = tail / (len(missing) + 1)
    if probs:
        share = min(share, min(probs.values()))
    out = {t: probs.get(t, share) for t in union}
    out[None] = max(0.0, tail - share * len(missing))
    return out


def topk_kl(dense_top: Mapping[Hashable, float], policy_top: Mapping[Hashable, float],
            eps: float = 1e-10) -> float:
    """KL(dense || policy) of one next-token distribution from top-k logprobs.

    Estimator: both distributions are coarse-grained onto the partition
    U = (union of both top-k token sets) + {every other token}.  Listed
    tokens keep their probabilities; a side's unlisted mass is assigned as in
    ``_fill``; bucket probabilities are floored at ``eps``.  Then
    KL = sum over the partition of P log(P / Q).  If the in-U probabilities
    were all exact this would be a lower bound of the full-vocabulary KL (the
    data-processing inequality); the ``_fill`` guesses make it an estimate.
    Identical inputs give 0 exactly."""
    union = set(dense_top) | set(policy_top)
    p, q = _fill(dense_top, union), _fill(policy_top, union)
    kl = 0.0
    for t, pt in p.items():
        if pt <= 0.0:
            continue
        kl += pt * (math.log(max(pt, eps)) - math.log(max(q[t], eps)))
    return max(0.0, kl)


def comparable_positions(policy_tokens: Sequence[Hashable], dense_tokens: Sequence[Hashable]) -> int:
    """Positions whose next-token distributions share their context: the
    common prefix plus the first position after it (where they split)."""
    return min(common_prefix_len(policy_tokens, dense_tokens) + 1, len(policy_tokens), len(dense_tokens))


def mean_topk_kl(dense_tops: Sequence[Mapping], policy_tops: Sequence[Mapping],
                 dense_tokens: Sequence[Hashable] | None = None,
                 policy_tokens: Sequence[Hashable] | None = None) -> float:
    """Mean ``topk_kl`` over positions.  With the generated tokens given, only
    the ``comparable_positions`` are used (after a split the two runs condition
    on different text); without them, all aligned positions are (e.g. when
    both scored the same teacher-forced text through ``prompt_logprobs``)."""
    n = min(len(dense_tops), len(policy_tops))
    if dense_tokens is not None and policy_tokens is not None:
        n = min(n, comparable_positions(policy_tokens, dense_tokens))
    if n == 0:
        return 0.0
    return sum(topk_kl(dense_tops[i], policy_tops[i]) for i in range(n)) / n


def tail_nll(token_logprobs: Sequence[float | None], n_tail: int | None = None) -> float:
    """Mean negative logprob of the last ``n_tail`` (default: all) given
    tokens; ``None`` entries (vLLM's first prompt token) are skipped."""
    vals = [lp for lp in token_logprobs if lp is not None]
    if n_tail is not None:
        vals = vals[-n_tail:] if n_tail > 0 else []
    return -sum(vals) / len(vals) if vals else 0.0


def perplexity(token_logprobs: Sequence[float | None], n_tail: int | None = None) -> float:
    return math.exp(tail_nll(token_logprobs, n_tail))


def kl_score(kl: float) -> float:
    """Map a KL (nats) into (0, 1] for averaging with other scores: exp(-KL)."""
    return math.exp(-max(0.0, kl))


# ---- aggregation ---------------------------------------------------------------------

def mean_ci(values: Sequence[float], conf: float = 0.95, n_boot: int = 2000,
            seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap over the samples with a fixed
    seed.  One value gives (v, v, v); an empty list raises ValueError."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_ci of no values")
    n = len(vals)
    mean = sum(vals) / n
    if n == 1 or min(vals) == max(vals):
        return mean, mean, mean
    rng = random.Random(seed)
    boots = sorted(sum(vals[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    lo_i = int(math.floor((1 - conf) / 2 * n_boot))
    hi_i = min(n_boot - 1, int(math.ceil((1 + conf) / 2 * n_boot)) - 1)
    return mean, boots[lo_i], boots[hi_i]
