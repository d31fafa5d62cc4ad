"""Budget allocators: how many prompt tokens each layer and KV head keeps.

Every allocator starts from the configured per-head budget ``b`` (``kv_budget``,
or ``kv_ratio`` of the prompt) and keeps the total fixed: layers average ``b``,
and a layer's heads share ``Hkv * b``.  ``layer_budget`` is a host int (it
also sizes the cache a request holds); ``head_budgets`` may look at a
layer's scores and returns an int (uniform) or an ``[Hkv]`` device tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Uniform:
    """Every layer and head keeps ``b``."""

    def layer_budget(self, layer: int, num_layers: int, prompt_len: int, budget: int) -> int:
        return min(prompt_len, budget)

    def head_budgets(self, scores: torch.Tensor, budget: int, pinned: int) -> int:
        return budget

    def max_head_budget(self, budget: int, pinned: int, num_kv: int, prompt_len: int) -> int:
        """The most tokens one head of a layer with ``budget`` may keep (sizes the compacted region)."""
        return min(prompt_len, budget)


@dataclass
class Pyramid(Uniform):
    """PyramidKV: budgets shrink linearly with depth, with a floor.

    Every layer keeps the ``floor`` (the observation window, which SnapKV-style
    scorers always keep) plus a share of the rest that falls linearly from the
    first layer to the last, the last layer's share being ``1 / beta`` of the
    mean; the layers average ``b``.  When ``b`` leaves nothing above the floor,
    or the first layer would need more than the prompt, the budgets are
    uniform.
    """

    beta: float = 20.0
    floor: int = 32

    def layer_budget(self, layer: int, num_layers: int, prompt_len: int, budget: int) -> int:
        mean = min(prompt_len, budget)
        floor = min(self.floor, prompt_len)
        share = mean - floor
        if num_layers <= 1 or share <= 0 or mean >= prompt_len:
            return mean
        low = share / self.beta
        high = 2 * share - low
        if floor + high > prompt_len:  # the top is capped by the prompt: keep the mean
            high = prompt_len - floor
            low = 2 * share - high
        b = floor + high - (high - low) * layer / (num_layers - 1)
        return max(floor, min(prompt_len, round(b)))


@dataclass
class HeadAdaptive(Uniform):
    """Ada-KV: a layer's ``Hkv * b`` tokens go to the heads by their attention share.

    Every head keeps its ``pinned`` tokens (``+inf`` scores, e.g. the
    observation window) and ``floor`` of the rest of its budget (the
    safeguard); the remaining tokens go to the highest shares of any head, so
    focused heads give tokens to diffuse ones.
    """

    floor: float = 0.2

    def max_head_budget(self, budget: int, pinned: int, num_kv: int, prompt_len: int) -> int:
        # one head may take every share but the others' pinned tokens and floors
        free = budget - pinned
        return min(prompt_len, budget + max(0, (num_kv - 1) * (free - int(self.floor * free))))

    def head_budgets(self, scores: torch.Tensor, budget: int, pinned: int) -> int | torch.Tensor:
        num_kv, length = scores.shape
        free = budget - pinned
        if free <= 0 or budget >= length:
            return budget
        window = torch.isinf(scores)
        finite = scores.masked_fill(window, 0.0)
        share = (finite / finite.sum(1, keepdim=True).clamp_min(1e-9)).masked_fill(window, float("-inf"))
        floor = int(self.floor * free)
        counts = torch.full((num_kv,), pinned + floor, dtype=torch.int64, device=scores.device)
        rest = num_kv * free - num_kv * floor
        if rest <= 0:
            return counts
        if floor > 0:  # each head's floor picks leave the competition
            top = torch.topk(share, floor, dim=1).indices
            share = share.scatter(1, top, float("-inf"))
        winners = torch.topk(share.flatten(), rest).indices // length
        return counts.scatter_add(0, winners, torch.ones_like(winners))


@dataclass
class ByNeed(Uniform):
    """CASAK-V: a layer's ``Hkv * b`` tokens go to its heads by what each head's pattern needs.

    A head needs the tokens its pattern covers (a window head its sinks and
    window, a stripe head its columns); a head without a cheap pattern
    (``full``) asks for ``b``.  Every head keeps at least ``floor`` of the
    budget above its pinned tokens and at most ``(1 + spread) * b`` (the
    compacted region is as wide as the widest head, so ``spread`` is what
    moving budget between heads costs in memory).  When the needs add up to
    more than ``Hkv * b`` they are scaled down to it; when less, the rest is
    shared evenly.  All on the device (no host sync).
    """

    floor: float = 0.2
    spread: float = 0.25

    def max_head_budget(self, budget: int, pinned: int, num_kv: int, prompt_len: int) -> int:
        return min(prompt_len, int((1.0 + self.spread) * budget))

    def by_need(self, need: torch.Tensor, budget: int, pinned: int, prompt_len: int,
                total: torch.Tensor | None = None) -> torch.Tensor:
        """``need`` ``[Hkv]`` int64 -> budgets ``[Hkv]`` int64 summing to at most ``total`` (default
        ``Hkv * budget``; a 0-d tensor when the layer's share comes from ``across_layers``).  Floor and cap
        come from ``budget`` either way."""
        num_kv = need.shape[0]
        floor = min(budget, pinned + int(self.floor * max(0, budget - pinned)))
        cap = self.max_head_budget(budget, pinned, num_kv, prompt_len)
        want = need.clamp(floor, cap)
        total = num_kv * budget if total is None else total
        over = want - floor
        scaled = floor + (over * (total - num_kv * floor)) // over.sum().clamp_min(1)
        extra = (total - want.sum()).clamp_min(0)
        shared = want + extra // num_kv + (torch.arange(num_kv, device=need.device) < extra % num_kv).long()
        return torch.where(want.sum() > total, scaled, shared).clamp(max=cap)


def across_layers(alloc: ByNeed, needs: torch.Tensor, budget: int, pinned: int, prompt_len: int) -> torch.Tensor:
    """``needs`` ``[layers, Hkv]`` -> each layer's share ``[layers]`` of the request's ``layers * Hkv * budget``
    tokens, by the layers' summed needs (each head's clamped to its floor and cap first): the same rule as
    between heads, one level up, so a layer keeps between ``Hkv`` floors and ``Hkv`` caps.  The compacted
    region stays ``(1 + spread) * budget`` wide (no head of any layer exceeds it), so this moves tokens,
    not memory.  On the device."""
    num_layers, num_kv = needs.shape
    floor = min(budget, pinned + int(alloc.floor * max(0, budget - pinned)))
    cap = alloc.max_head_budget(budget, pinned, num_kv, prompt_len)
    layer_need = needs.clamp(floor, cap).sum(1)
    shares = alloc.by_need(layer_need, num_kv * budget, num_kv * pinned, num_kv * prompt_len)
    return shares.clamp(num_kv * floor, num_kv * cap)
