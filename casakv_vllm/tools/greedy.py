"""Comparing two greedy generations token by token.

Two correct attention kernels that round differently (bf16 vs fp32
probabilities, different batch shapes) can part ways where the model's top two
tokens are nearly tied.  ``divergence`` finds the first differing token and
the logprob gap of that choice on both sides, so a caller can accept a split
at a near-tie and reject any other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# One generated token: (token text, {top token: logprob}).
Step = tuple[str, dict[str, float]]


@dataclass(frozen=True)
class Divergence:
    index: int
    gap_a: float  # logprob(a's token) - logprob(b's token), as seen by a
    gap_b: float  # the same from b's side

    def is_near_tie(self, tol: float) -> bool:
        return self.gap_a < tol and self.gap_b < tol


def divergence(a: list[Step], b: list[Step]) -> Divergence | None:
    """First differing token of two generations, or None if they are identical."""
    for i, ((ta, top_a), (tb, top_b)) in enumerate(zip(a, b)):
        if ta != tb:
            return Divergence(i, top_a[ta] - top_a.get(tb, -math.inf), top_b[tb] - top_b.get(ta, -math.inf))
    if len(a) != len(b):
        return Divergence(min(len(a), len(b)), math.inf, math.inf)
    return None


def chat_steps(reply: dict) -> list[Step]:
    """Steps of an OpenAI chat completion requested with logprobs/top_logprobs."""
    return [(t["token"], {c["token"]: c["logprob"] for c in t["top_logprobs"]})
            for t in reply["choices"][0]["logprobs"]["content"]]


def completion_steps(reply: dict) -> list[Step]:
    """Steps of an OpenAI completion requested with ``logprobs=k``."""
    lp = reply["choices"][0]["logprobs"]
    return list(zip(lp["tokens"], lp["top_logprobs"]))
