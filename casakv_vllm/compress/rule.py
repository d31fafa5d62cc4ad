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

    def live_slots(self, seq_len: int) -> int:
        """Slots a compacted request reads at ``seq_len``: ``[0, head_end)`` and ``[tail_start, seq_len)``."""
        return self.head_end + seq_len - self.tail_start

    def settled(self, processed_tokens: int) -> bool:
        """True once the forward that compacted (the first decode step) has finished."""
        return processed_tokens > self.prompt_len


def compaction_terms(policy, prompt_len: int, first_context: int, block_size: int,
                     num_kv_heads: int) -> CompactionTerms | None:
    """The request's terms, or None when it does not compact (its policy does not select once)."""
    compacts = getattr(policy, "compacts", None)
    if compacts is None or not compacts() or prompt_len <= 0:
        return None
    shared = min(cdiv(first_context, block_size) * block_size, prompt_len)
    slots = policy.slot_budget(prompt_len, num_kv_heads)
    terms = CompactionTerms(block_size, prompt_len, shared, slots)
    return terms if terms.compacts else None
