"""What data-dependent policies see of a prompt: its last queries and its attention mass.

SnapKV-style policies choose the KV to keep from how the *last* prompt
queries attend; H2O also needs the attention mass each key received from
*every* prompt query.  Both are recorded per layer while the prompt is
prefilled (``record_chunk``) and read when the request starts decoding.

They are kept per *prompt* (keyed by a hash of its token ids), not per
request: with prefix caching a later request with the same prompt reuses the
cached KV blocks, and vLLM recomputes only the last few prompt tokens, so the
observations of the first request must be available to it.  A small LRU of
prompts bounds the memory (about 5 MB per 4k-token prompt on the demo model).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

#: queries of the prompt's tail kept per layer (SnapKV windows, MInference's last-q)
OBS_WINDOW = 64
#: prompts whose observations are kept
MAX_PROMPTS = 48
#: query rows per block when column sums are computed (bounds memory)
_ROWS_PER_BLOCK = 256


def prompt_key(token_ids) -> str:
    """Stable key of a prompt's token ids."""
    data = ",".join(map(str, token_ids)).encode()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass
class LayerObservation:
    """One layer's record of a prompt of ``prompt_len`` tokens.

    Attributes:
        window_q: ``[num_heads, W, D]`` fp32, queries of positions
            ``prompt_len - W ..  prompt_len - 1`` (``W = min(OBS_WINDOW, prompt_len)``).
        window_seen: ``[W]`` bool, which of those rows were recorded.
        col_sums: ``[num_kv_heads, prompt_len]`` fp32, attention probability
            each key received, summed over all prompt queries and the query
            heads of its group; None until a policy asks for it.
        col_rows: prompt rows whose attention is in ``col_sums``.
    """

    window_q: torch.Tensor
    window_seen: torch.Tensor
    col_sums: torch.Tensor | None = None
    col_rows: int = 0

    @property
    def window_complete(self) -> bool:
        return bool(self.window_seen.all())


@dataclass
class PromptObservations:
    prompt_len: int
    layers: dict[int, LayerObservation] = field(default_factory=dict)


class ObservationStore:
    """LRU of :class:`PromptObservations`, one per prompt key (per worker)."""

    def __init__(self, max_prompts: int = MAX_PROMPTS):
        self.max_prompts = max_prompts
        self._prompts: OrderedDict[str, PromptObservations] = OrderedDict()

    def get(self, key: str, prompt_len: int) -> PromptObservations:
        obs = self._prompts.get(key)
        if obs is None or obs.prompt_len != prompt_len:
            obs = PromptObservations(prompt_len)
            self._prompts[key] = obs
            while len(self._prompts) > self.max_prompts:
                self._prompts.popitem(last=False)
        self._prompts.move_to_end(key)
        return obs

    def __len__(self) -> int:
        return len(self._prompts)


STORE = ObservationStore()


def record_chunk(
    obs: PromptObservations, layer: int, q: torch.Tensor, k: torch.Tensor, ctx: int, scale: float,
    want_col_sums: bool,
) -> None:
    """Record one prefill chunk of a prompt.

    Args:
        q: ``[num_heads, q_len, D]`` queries at positions ``ctx .. ctx + q_len - 1``.
        k: ``[num_kv_heads, ctx + q_len, D]`` keys of the sequence so far.
        want_col_sums: accumulate every prompt row's attention per key (H2O).
    """
    num_heads, q_len, dim = q.shape
    plen = obs.prompt_len
    w = min(OBS_WINDOW, plen)
    lo = plen - w
    rec = obs.layers.get(layer)
    if rec is None:
        rec = LayerObservation(torch.zeros(num_heads, w, dim), torch.zeros(w, dtype=torch.bool))
        obs.layers[layer] = rec
    # rows of this chunk that fall in the prompt's tail window
    first, last = max(ctx, lo), min(ctx + q_len, plen)
    if first < last:
        rec.window_q[:, first - lo:last - lo] = q[:, first - ctx:last - ctx].float()
        rec.window_seen[first - lo:last - lo] = True
    if want_col_sums and rec.col_rows == ctx and ctx < plen:
        rows = min(ctx + q_len, plen) - ctx
        if rec.col_sums is None:
            rec.col_sums = torch.zeros(k.shape[0], plen)
        for r0 in range(0, rows, _ROWS_PER_BLOCK):
            r1 = min(rows, r0 + _ROWS_PER_BLOCK)
            probs = attention_probs(q[:, r0:r1], k[:, : ctx + r1], ctx + r0, scale)
            rec.col_sums[:, : ctx + r1] += group_sum(probs, k.shape[0]).sum(1)
        rec.col_rows = ctx + rows


def attention_probs(q: torch.Tensor, k: torch.Tensor, first_pos, scale: float,
                    allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Causal softmax probabilities, fp32.

    Args:
        q: ``[num_heads, n, D]`` at positions ``first_pos ..`` (an int), or at
            the positions given by an ``[n]`` tensor.
        k: ``[num_kv_heads, S, D]``.
        allowed: optional ``[num_kv_heads, n, S]`` bool mask (on top of causal).
    Returns:
        ``[num_heads, n, S]``.
    """
    num_heads, n, _ = q.shape
    num_kv, seq, _ = k.shape
    group = num_heads // num_kv
    kf = k.float().repeat_interleave(group, dim=0) if group > 1 else k.float()
    logits = torch.matmul(q.float(), kf.transpose(1, 2)) * scale
    pos = torch.arange(n) + first_pos if isinstance(first_pos, int) else first_pos
    mask = torch.arange(seq).unsqueeze(0) <= pos.unsqueeze(1)
    if allowed is not None:
        mask = mask & (allowed.repeat_interleave(group, dim=0) if group > 1 else allowed)
    logits = logits.masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, dim=-1)


def group_sum(probs: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``[num_heads, ...]`` -> ``[num_kv_heads, ...]`` summed over each GQA group."""
    num_heads = probs.shape[0]
    return probs.reshape(num_kv_heads, num_heads // num_kv_heads, *probs.shape[1:]).sum(1)
