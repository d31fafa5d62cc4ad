"""Per-request state in a worker: typed, keyed by request, released when the request ends.

vLLM's attention metadata names no requests, but the model runner tells
logits processors about every request added to, removed from and moved
within the persistent batch, before the forward pass and with the row
indices the attention metadata uses (``integration.tracker``).  The
:class:`RequestTable` keeps those rows.

Keying.  A request leaves the persistent batch when it finishes, is aborted
or preempted, but also when it is merely not scheduled in a step; it comes
back with the same ``SamplingParams`` object, which the model runner keeps
for the request's whole life.  So state is keyed by that object: a request
that returns finds its state again, and a weak reference releases the state
when the runner drops the request (finish, abort).  A preempted request is
recomputed from scratch when it resumes: the builder sees its KV length go
back (``RequestState.restart``) and starts it afresh.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

from casakv_vllm.compress.rule import CompactionTerms, LiveLayout
from casakv_vllm.policies.keepset import LayerKeep

_ids = itertools.count()


@dataclass(eq=False)
class RequestState:
    """One request, as casakv sees it.

    Attributes:
        prompt_len: prompt tokens (0 when vLLM gave none, e.g. prompt embeddings).
        overrides: its ``vllm_xargs`` settings (``requests.params.request_overrides``).
        prompt_key: hash of the prompt's token ids (``observe.store.prompt_key``).
        question_at: the prompt token where its question starts (``requests.params.question_at``; None:
            no question): its policy selects over the context before it, as if that were the prompt.
        context_key: hash of the context's token ids (with a question): its observations' key.
        keep: per layer, the request's keep-set (evicting policies, once decoding).
        kv_len: KV positions computed so far (the longest sequence seen).
        restarts: times the request was recomputed from scratch (preemption).
        first_context: context length of its first scheduled step (its prefix-cache hit).
        compaction: where its compacted region lies (``compress.rule``; fixed at its first step,
            None when it does not compact; only in its first life).
        terms_known: ``compaction`` was decided.
        layout: its live slots after the latest compaction event (``rule.LiveLayout``).
        prefill_patterns: per layer, ``(seq_len, PatternBatch)``: the patterns its policy estimated for
            sparse prefill, and the sequence length they were estimated at (CPU sparse prefill).
        holes: CUDA, once compacted: ``[num_layers, Hkv, 3]`` int32, each layer and head's empty
            slots ``[shared + kept, head_end)`` and the skip bits of its first tail block (what the
            decode kernel skips).
        uid: process-unique number, for logs and tests.
    """

    prompt_len: int
    overrides: tuple[tuple[str, Any], ...] = ()
    prompt_key: str | None = None
    question_at: int | None = None
    context_key: str | None = None
    keep: dict[int, LayerKeep] = field(default_factory=dict)
    kv_len: int = 0
    restarts: int = 0
    first_context: int = 0
    compaction: CompactionTerms | None = None
    terms_known: bool = False
    layout: LiveLayout | None = None
    holes: Any = None
    prefill_patterns: dict[int, tuple[int, Any]] = field(default_factory=dict)
    uid: int = field(default_factory=lambda: next(_ids))

    @property
    def select_len(self) -> int:
        """The prompt tokens its policy selects over: the context before its question, or the whole prompt."""
        return self.prompt_len if self.question_at is None else self.question_at

    @property
    def obs_key(self) -> str | None:
        """Key of the observations its policy reads (the context's, with a question)."""
        return self.prompt_key if self.question_at is None else self.context_key

    def advance(self, context_len: int, seq_len: int) -> bool:
        """A step computes positions ``context_len .. seq_len - 1``; returns True when it starts
        below what was already computed, i.e. the request is being recomputed (the caller restarts it)."""
        if self.kv_len == 0:
            self.first_context = context_len
        restarted = context_len < self.kv_len
        self.kv_len = seq_len if restarted else max(self.kv_len, seq_len)
        return restarted

    def restart(self) -> None:
        """Recomputed from scratch: what it kept is gone (``advance`` already reset ``kv_len``)."""
        self.keep.clear()
        self.prefill_patterns.clear()
        self.compaction = self.layout = self.holes = None
        self.restarts += 1


class RequestTable:
    """The rows of the persistent batch and the state of every live request (one per worker)."""

    def __init__(self) -> None:
        self.rows: list[RequestState | None] = []
        self._live: dict[int, RequestState] = {}  # id(params) -> state, while the params object lives
        self.released = 0  # states released because their request ended
        self.restarts = 0  # requests recomputed from scratch
        # Called after every change of the counts above (the worker's metrics publish them), also
        # from the weak-reference release, which runs in a step that plans no batch.
        self.on_change: Callable[[RequestTable], None] | None = None

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self)

    def __len__(self) -> int:
        return len(self._live)

    def _grow(self, size: int) -> None:
        if len(self.rows) < size:
            self.rows.extend([None] * (size - len(self.rows)))

    def add(self, index: int, params, prompt_len: int, overrides: tuple, prompt_key: str | None,
            question_at: int | None = None, context_key: str | None = None) -> RequestState:
        """Row ``index`` holds the request of ``params`` (a new one, or one coming back)."""
        self._grow(index + 1)
        key = id(params) if params is not None else None
        state = self._live.get(key) if key is not None else None
        if state is None:
            state = RequestState(prompt_len, overrides, prompt_key, question_at, context_key)
            if key is not None:
                self._live[key] = state
                weakref.finalize(params, self._release, key, state.uid)
                self._changed()
        self.rows[index] = state
        return state

    def _release(self, key: int, uid: int) -> None:
        state = self._live.get(key)
        if state is not None and state.uid == uid:
            del self._live[key]
            self.released += 1
            self._changed()

    def restarted(self, state: RequestState) -> None:
        """``state`` is being recomputed from scratch (preemption): drop what it held."""
        state.restart()
        self.restarts += 1
        self._changed()

    def remove(self, index: int) -> None:
        if index < len(self.rows):
            self.rows[index] = None

    def swap(self, a: int, b: int) -> None:
        self._grow(max(a, b) + 1)
        self.rows[a], self.rows[b] = self.rows[b], self.rows[a]

    def move(self, src: int, dst: int) -> None:
        self._grow(max(src, dst) + 1)
        self.rows[dst], self.rows[src] = self.rows[src], None

    def slots(self, num_reqs: int) -> list[RequestState | None]:
        """The first ``num_reqs`` rows (None where unknown)."""
        head = self.rows[:num_reqs]
        return head + [None] * (num_reqs - len(head))
