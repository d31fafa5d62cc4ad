import math

from casakv_vllm.tools.greedy import Divergence, divergence


def _steps(tokens, tops):
    return list(zip(tokens, tops))


def test_identical_is_none():
    a = _steps(["x", "y"], [{"x": -0.1}, {"y": -0.2}])
    assert divergence(a, a) is None


def test_near_tie_gaps():
    a = _steps(["x", "y"], [{"x": -0.1}, {"y": -0.60, "z": -0.70}])
    b = _steps(["x", "z"], [{"x": -0.1}, {"z": -0.65, "y": -0.66}])
    d = divergence(a, b)
    assert d.index == 1 and math.isclose(d.gap_a, 0.10) and math.isclose(d.gap_b, 0.01)
    assert d.is_near_tie(0.5) and not d.is_near_tie(0.05)


def test_unseen_token_is_not_a_tie():
    a = _steps(["x"], [{"x": -0.1}])
    b = _steps(["q"], [{"q": -0.1}])
    assert divergence(a, b) == Divergence(0, math.inf, math.inf)


def test_length_mismatch():
    a = _steps(["x", "y"], [{"x": -0.1}, {"y": -0.1}])
    assert divergence(a, a[:1]).index == 1
