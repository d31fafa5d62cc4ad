"""The rule that keeps vLLM's scheduler and casakv's workers in agreement about compacted requests.

vLLM keeps one block table per KV-cache group, shared by every layer, and does
not tell workers when it frees a block.  So both sides derive, from facts both
hold, which logical blocks of a request stay live and when the others may go
back to the pool; nothing is sent from worker to scheduler.

Facts: the block size; the request's prompt length ``P``; how many leading
tokens it took from the prefix cache (``shared``: the context length of its
first scheduled chunk); its policy and per-request settings (server config plus
``vllm_xargs``); the KV heads per rank.  From them, for a select-once evicting
policy, in the request's first life (never after a preemption):

- ``tail_start``: the first position of the block holding the prompt's last
  token.  That block and every later one stay as they are (decode writes there).
- ``head_end``: positions ``[0, shared)`` stay dense (blocks possibly shared
  with other requests or the prefix cache are never written); each (layer,
  KV head) moves the prompt tokens it keeps from ``[shared, tail_start)`` into
  the slots right after ``shared``.  ``slots``, the most tokens any layer and
  head keeps there, is the same on every layer and head (and every TP rank),
  so the compacted region ends at ``shared + slots`` rounded up to a block.
- The blocks ``[head_end, tail_start)`` are freed.  The worker compacts in the
  forward of the request's first decode step (it reads ``P`` positions); the
  scheduler frees in a later scheduling step, once that forward has settled
  (vLLM's processed-token count passes ``P``).

While generating (``chunk``, the policy's ``chunk_size``): compaction event
``j`` happens in the decode step that reads ``e_j = P + j * chunk``
positions (``e_0 = P`` is the one above).  Its tail starts at ``T_j``, the
first position of the block holding position ``e_j``; each layer and head
moves what it keeps of ``[shared, T_j)`` (the compacted slots and the
generated tokens before ``T_j``) into the same ``slots``, and once the
event's forward has settled (processed tokens ``> e_j``) the scheduler frees
the blocks ``[T_{j-1}, T_j)``.  So a request holds at most its ``slots``
plus one chunk (and a block) of generated tokens.

While the prompt is prefilled (``prefill``, the policy's
``prefill_compression``: CASAK-V's chunk-wise compression): events also fall
at the positions ``head_end + k * chunk`` (``k >= 1``) before the prompt's
last token, and at the last token ``P - 1`` itself, which replaces ``e_0``.
The prefill step computing such a position compacts, after its attention,
what each layer and head keeps of everything before the block holding it,
ranked by the votes of that chunk's last queries; later chunks attend through
the compacted KV.  A step holding several event positions performs the last
one.  So a long prompt holds at most ``slots``, one chunk and the step's own
tokens, never the whole prompt.

A request whose question arrives after its context (``context``: the prompt
token where the question starts, ``vllm_xargs`` ``casakv_question_at``; the
question-agnostic protocol) keeps every question token: its policy selects
over ``[0, context)`` as if the context were the whole prompt (``slots`` from
the context length), and ``tail_start`` is the first position of the block
holding the context's end, so the question's blocks stay dense in the tail,
on both sides alike.  Later events treat question tokens like generated
ones.  (Prefill compression does not combine with a question.)

Every event is named by its position ``e`` and compacts up to
``tail_at(e)``; the scheduler frees up to the tail of the latest event below
its processed-token count.  Both sides see every step of a request (the
worker in its batches, the scheduler when it allocates), so a rule on
positions is all they share.
"""

from __future__ import annotations

from dataclasses import dataclass


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class CompactionTerms:
    """Where one request's compacted region lies (all in token positions / slots)."""

    block_size: int
    prompt_len: int
    shared: int  # leading positions that stay dense (block-aligned)
    slots: int  # compacted slots per (layer, KV head)
    chunk: int | None = None  # tokens between compaction events (None: compact once)
    prefill: bool = False  # events while the prompt is prefilled too (needs ``chunk``)
    context: int | None = None  # where the request's question starts (None: no question)

    @property
    def context_end(self) -> int:
        """The prompt tokens the policy selects over: the context before the question, or the whole prompt."""
        return self.prompt_len if self.context is None else min(self.context, self.prompt_len)

    @property
    def tail_start(self) -> int:
        return (self.context_end // self.block_size) * self.block_size

    @property
    def head_end(self) -> int:
        return min(self.tail_start, cdiv(self.shared + self.slots, self.block_size) * self.block_size)

    @property
    def compacts(self) -> bool:
        """Whether any block is freed (else the request stays as it is)."""
        return self.head_end < self.tail_start

    @property
    def freed_blocks(self) -> range:
        """Logical block indices the first decode-time event leaves freed (compaction at the end of prefill)."""
        return range(self.head_end // self.block_size, self.tail_start // self.block_size)

    def tail_at(self, position: int) -> int:
        """The tail of the event at ``position``: the first position of its block (``tail_start`` for the
        first decode-time event, so a question stays in the tail)."""
        if position == self.prompt_len and not self.prefill:
            return self.tail_start
        return (position // self.block_size) * self.block_size

    def event_position(self, j: int) -> int:
        """``e_j``: the positions read by the decode step of compaction event ``j``."""
        return self.prompt_len + j * (self.chunk or 0)

    def event_tail(self, j: int) -> int:
        """``T_j``: where the tail starts after event ``j`` (``T_0 = tail_start``)."""
        return self.tail_at(self.event_position(j))

    def last_event_before(self, limit: int) -> int | None:
        """The largest event position below ``limit`` (None: no event yet)."""
        p, c = self.prompt_len, self.chunk
        if c and limit > p + c:
            return p + (limit - 1 - p) // c * c
        if not self.prefill:
            return p if limit > p else None
        if limit > p - 1:
            return p - 1
        k = (limit - 1 - self.head_end) // c if c else 0
        return self.head_end + k * c if k >= 1 else None

    def event_in(self, context_len: int, seq_len: int) -> int | None:
        """The event position a step computing positions ``context_len .. seq_len - 1`` performs (None:
        none): the last one among them."""
        e = self.last_event_before(seq_len)
        return e if e is not None and e >= context_len else None

    def settled_tail(self, processed_tokens: int) -> int | None:
        """The tail of the latest event whose forward has finished (None before the first)."""
        e = self.last_event_before(processed_tokens)
        return None if e is None else self.tail_at(e)

    def peak_tokens(self, max_step_tokens: int) -> int:
        """The most positions a prefill-compressing request holds blocks for: its region, what one chunk
        leaves before the next event, and a step's own tokens (block-rounded)."""
        return self.head_end + (self.chunk or 0) + max_step_tokens + 2 * self.block_size

    def layout(self, tail: int) -> "LiveLayout":
        return LiveLayout(self.head_end, tail)


@dataclass(frozen=True)
class LiveLayout:
    """A compacted request's live slots: ``[0, head_end)`` and ``[tail, ...)`` (positions from ``tail`` on)."""

    head_end: int
    tail: int

    def width(self, seq_len: int) -> int:
        """Live slots at ``seq_len`` positions."""
        return self.head_end + seq_len - self.tail

    def column_of(self, slot: int) -> int:
        """The live column of slot ``slot`` (``slot < head_end`` or ``>= tail``)."""
        return slot if slot < self.head_end else self.head_end + slot - self.tail


def compaction_terms(policy, prompt_len: int, first_context: int, block_size: int,
                     num_kv_heads: int, question_at: int | None = None) -> CompactionTerms | None:
    """The request's terms, or None when it does not compact (its policy does not select once).
    ``question_at``: where its question starts (``requests.params.question_at``; None: no question)."""
    compacts = getattr(policy, "compacts", None)
    if compacts is None or not compacts() or prompt_len <= 0:
        return None
    shared = min(cdiv(first_context, block_size) * block_size, prompt_len)
    config = policy.config
    prefill = bool(config.prefill_compression and config.chunk_size)
    context = question_at if question_at is not None and not prefill and 0 < question_at < prompt_len else None
    slots = policy.slot_budget(context or prompt_len, num_kv_heads)
    terms = CompactionTerms(block_size, prompt_len, shared, slots, config.chunk_size, prefill, context)
    return terms if terms.compacts else None
