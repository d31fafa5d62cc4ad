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
    chunk: int | None = None  # generated tokens between compaction events (None: compact once)

    @property
    def tail_start(self) -> int:
        return (self.prompt_len // self.block_size) * self.block_size

    @property
    def head_end(self) -> int:
        return min(self.tail_start, cdiv(self.shared + self.slots, self.block_size) * self.block_size)

    @property
    def compacts(self) -> bool:
        """Whether any block is freed (else the request stays as it is)."""
        return self.head_end < self.tail_start

    @property
    def freed_blocks(self) -> range:
        """Logical block indices returned to the pool."""
        return range(self.head_end // self.block_size, self.tail_start // self.block_size)

    def event_position(self, j: int) -> int:
        """``e_j``: the positions read by the decode step of compaction event ``j``."""
        return self.prompt_len + j * (self.chunk or 0)

    def event_tail(self, j: int) -> int:
        """``T_j``: where the tail starts after event ``j`` (``T_0 = tail_start``)."""
        return (self.event_position(j) // self.block_size) * self.block_size

    def event_in(self, context_len: int, seq_len: int) -> int | None:
        """The event a step computing positions ``context_len .. seq_len - 1`` performs (None: none)."""
        if context_len < self.prompt_len or (context_len > self.prompt_len and not self.chunk):
            return None
        j = -(-(context_len - self.prompt_len) // self.chunk) if self.chunk else 0
        return j if self.event_position(j) < seq_len else None

    def settled_tail(self, processed_tokens: int) -> int | None:
        """``T_j`` of the latest event whose forward has finished (None before the first)."""
        if processed_tokens <= self.prompt_len:
            return None
        j = (processed_tokens - 1 - self.prompt_len) // self.chunk if self.chunk else 0
        return self.event_tail(j)

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
                     num_kv_heads: int) -> CompactionTerms | None:
    """The request's terms, or None when it does not compact (its policy does not select once)."""
    compacts = getattr(policy, "compacts", None)
    if compacts is None or not compacts() or prompt_len <= 0:
        return None
    shared = min(cdiv(first_context, block_size) * block_size, prompt_len)
    slots = policy.slot_budget(prompt_len, num_kv_heads)
    terms = CompactionTerms(block_size, prompt_len, shared, slots, policy.config.chunk_size)
    return terms if terms.compacts else None
