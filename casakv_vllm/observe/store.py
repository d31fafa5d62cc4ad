"""What data-dependent policies see of a prompt, kept per prompt on the KV device.

SnapKV-style policies choose the KV to keep from how the *last* prompt queries
attend; H2O also needs the attention mass each key received from *every*
prompt query.  Both are recorded per layer while the prompt is prefilled (see
``observe.record``), by every prefill row whatever its policy, and read when a
request of that prompt starts decoding.

They are kept per *prompt* (a hash of its token ids), not per request: with
prefix caching a later request with the same prompt reuses the cached KV
blocks and vLLM recomputes only its last tokens, so the observations of the
request that computed the prompt must be there for it.  The store is an LRU
bounded by bytes (about 2 MB per 4k-token prompt on the demo model in bf16).

Which window rows have been recorded is host-side knowledge: the metadata
builder plans every recording before the layers run, so reading it never
synchronises with the device.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

#: queries of the prompt's tail kept per layer (SnapKV windows, MInference's last-q)
OBS_WINDOW = 64
#: default bound of one worker's store
MAX_BYTES = 256 * 2**20


def prompt_key(token_ids) -> str:
    """Stable key of a prompt's token ids."""
    data = ",".join(map(str, token_ids)).encode()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass
class LayerObservation:
    """One layer's record of a prompt, as the policies read it.

    Attributes:
        window_q: ``[num_heads, W, D]`` (query dtype, KV device): queries of
            positions ``prompt_len - W .. prompt_len - 1``, ``W = min(OBS_WINDOW, prompt_len)``.
        window_seen: host list of ``W`` bools: rows recorded so far.
        col_sums: ``[num_kv_heads, prompt_len]`` fp32 (device): attention each
            key received, summed over prompt rows ``0 .. col_rows - 1`` and the
            query heads of its group; None unless a policy asked for it.
        col_rows: prompt rows whose attention is in ``col_sums``.
        notes: what a policy derived from the prompt at its end (``Policy.on_prompt_observed``), shared by
            every layer of the prompt: a policy that allots budgets across layers reads every layer's here.
        question_later: the reader selects from a context whose question comes after it
            (``casakv_question_at``): the window's queries are the context's own, not a question's.
    """

    window_q: torch.Tensor
    window_seen: list[bool]
    col_sums: torch.Tensor | None = None
    col_rows: int = 0
    notes: dict = field(default_factory=dict)
    question_later: bool = False

    @property
    def window_complete(self) -> bool:
        return all(self.window_seen)

    def seen_rows(self, last: int) -> list[int]:
        """Indices among the last ``last`` window rows that were recorded (ascending)."""
        w = len(self.window_seen)
        return [i for i in range(max(0, w - last), w) if self.window_seen[i]]


@dataclass
class PromptObservations:
    """Every layer's record of one prompt (created on its first recorded chunk)."""

    prompt_len: int
    window_q: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [H, W, D]
    window_seen: list[bool] = field(default_factory=list)  # shared by all layers
    col_sums: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [Hkv, prompt_len]
    col_rows: int = 0  # shared by all layers (recorded in the same steps)
    notes: dict = field(default_factory=dict)  # policy key -> what it derived at the prompt's end (small)

    def __post_init__(self):
        if not self.window_seen:
            self.window_seen = [False] * min(OBS_WINDOW, self.prompt_len)

    @property
    def window(self) -> int:
        return len(self.window_seen)

    def layer(self, layer: int, question_later: bool = False) -> LayerObservation | None:
        q = self.window_q.get(layer)
        if q is None:
            return None
        return LayerObservation(q, self.window_seen, self.col_sums.get(layer), self.col_rows, self.notes,
                                question_later)

    def window_buffer(self, layer: int, like: torch.Tensor) -> torch.Tensor:
        """``[H, W, D]`` buffer of ``layer``, allocated on first use like ``like`` (``[T, H, D]``)."""
        buf = self.window_q.get(layer)
        if buf is None:
            buf = self.window_q[layer] = torch.zeros(like.shape[1], self.window, like.shape[2],
                                                     dtype=like.dtype, device=like.device)
        return buf

    def col_buffer(self, layer: int, num_kv_heads: int, device) -> torch.Tensor:
        buf = self.col_sums.get(layer)
        if buf is None:
            buf = self.col_sums[layer] = torch.zeros(num_kv_heads, self.prompt_len, device=device)
        return buf

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(t) for d in (self.window_q, self.col_sums, self.notes) for t in d.values())


def _nbytes(value) -> int:
    """Bytes of the tensors in ``value`` (a tensor, or tuples and objects holding them, as notes are)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return sum(_nbytes(v) for v in vars(value).values()) if hasattr(value, "__dict__") else 0


class ObservationStore:
    """LRU of :class:`PromptObservations`, one per prompt key (one per worker)."""

    def __init__(self, max_bytes: int = MAX_BYTES):
        self.max_bytes = max_bytes
        self._prompts: OrderedDict[str, PromptObservations] = OrderedDict()

    def get(self, key: str, prompt_len: int) -> PromptObservations:
        obs = self._prompts.get(key)
        if obs is None or obs.prompt_len != prompt_len:
            obs = self._prompts[key] = PromptObservations(prompt_len)
        self._prompts.move_to_end(key)
        return obs

    def peek(self, key: str, prompt_len: int) -> PromptObservations | None:
        obs = self._prompts.get(key)
        return obs if obs is not None and obs.prompt_len == prompt_len else None

    def trim(self) -> None:
        """Drop the least recently used prompts until the store fits its bound (the newest always stays)."""
        total = sum(o.nbytes for o in self._prompts.values())
        while total > self.max_bytes and len(self._prompts) > 1:
            _, old = self._prompts.popitem(last=False)
            total -= old.nbytes

    def __len__(self) -> int:
        return len(self._prompts)
