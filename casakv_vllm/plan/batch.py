"""The per-batch plan (FlashInfer's "plan"): built once by the metadata builder, read by every layer.

For each row of the batch: its request state, its policy, its lengths, and
whether its attention this step is dense causal (``dense``) or restricted by
the policy (``masked``: pattern policies, and evicting policies once a
request decodes).  Plus the observation recordings of prefill rows and
host-side counts for metrics.  Device plans (``plan.gpu``; on the CPU the
dense sub-batch of ``integration.cpu_kernels``) hang off the same object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from casakv_vllm.compress.rule import LiveLayout, compaction_terms
from casakv_vllm.observe.record import RecordJob, plan_record
from casakv_vllm.observe.store import ObservationStore, PromptObservations
from casakv_vllm.policies import Policy
from casakv_vllm.requests.resolve import PolicyResolver
from casakv_vllm.requests.state import RequestState, RequestTable


@dataclass
class RowPlan:
    """One row of the batch.

    Attributes:
        state: the request's state (None when no tracker knows the row).
        q_start, q_len, seq_len: the row's queries ``q_start .. q_start + q_len``
            attend to KV positions ``0 .. seq_len - 1``.
        dense: attention this step is dense causal.
        obs: the prompt's observations (evicting rows that decode; a sparse prefill row that ends the
            observed prompt).
        read: the live layout the row's attention reads this step (None: its slots are its
            positions; ``compress.rule.LiveLayout``).
        compact_tail: this step is a compaction event with this tail (``T_j``), after attention;
            ``state.compaction`` holds the terms and ``state.layout`` the layout afterwards.
        live_dense: a compacted row whose every live column is kept (prefill compression: each event
            fills every head's region, the tail is never evicted), so its attention is dense causal over
            its live blocks, read as a sequence of ``read.width(seq_len)`` tokens (``dense`` is set too).
        sparse: a prefill row computed under its request's own estimated patterns (``attention.sparse``:
            torch on the CPU, the sparse paged kernel on CUDA): only the (query, key) pairs they allow.
    """

    index: int
    state: RequestState | None
    policy: Policy
    label: str
    q_start: int
    q_len: int
    seq_len: int
    dense: bool
    obs: PromptObservations | None = None
    read: LiveLayout | None = None
    compact_tail: int | None = None
    live_dense: bool = False
    sparse: bool = False

    @property
    def compact(self) -> bool:
        return self.compact_tail is not None

    @property
    def context_len(self) -> int:
        return self.seq_len - self.q_len

    @property
    def read_len(self) -> int:
        """Columns the row's attention reads: its positions, or once compacted its live slots."""
        return self.seq_len if self.read is None else self.read.width(self.seq_len)

    @property
    def read_context(self) -> int:
        """Columns before the row's first query (the context of a dense row's kernel call)."""
        return self.read_len - self.q_len

    @property
    def prompt_len(self) -> int:
        return self.state.prompt_len if self.state is not None else 0

    @property
    def select_len(self) -> int:
        """The prompt tokens its policy selects over (``RequestState.select_len``)."""
        return self.state.select_len if self.state is not None else 0

    @property
    def asks(self) -> bool:
        """A prefill row computing question tokens: they attend through the context's keep-set."""
        return self.context_len < self.prompt_len and self.seq_len > self.select_len

    @property
    def evicting(self) -> bool:
        """The row's policy acts through its keep-set this step."""
        return self.policy.caps.evicts and not self.dense and not self.sparse


@dataclass
class BatchCounts:
    """Host counts of one batch, for metrics.  ``causal_kv``: (query, KV) pairs of full causal
    attention, per KV head."""

    prefill_tokens: int
    decode_tokens: int
    causal_kv: int


@dataclass
class BatchPlan:
    rows: list[RowPlan]
    records: list[RecordJob]
    counts: BatchCounts
    num_layers: int = 1
    gpu: Any = None  # plan.gpu.GpuPlan on CUDA
    cpu_dense: Any = None  # integration.cpu_kernels.DenseCall on the CPU (None: dense rows in torch)
    cpu_patterns: dict = field(default_factory=dict)  # CPU: layer (None: every layer) -> PatternBatch
    cpu_layout: str = "vec"  # CPU: the cache layout vLLM's kernels write (ops.paged)
    live_blocks: dict = field(default_factory=dict)  # row -> physical ids of a compacted row's live blocks (torch rows)
    stats: Any = None  # metrics.worker.WorkerStats

    @property
    def dense_rows(self) -> list[RowPlan]:
        return [r for r in self.rows if r.dense]

    @property
    def masked_rows(self) -> list[RowPlan]:
        return [r for r in self.rows if not r.dense]

    @property
    def all_dense(self) -> bool:
        return all(r.dense for r in self.rows)

    def kernel_view(self, seq_lens, block_table):
        """``(seq_lens, block_table)`` as the dense kernels read them: a ``live_dense`` row's length is its
        live columns and its table row its live blocks (``live_blocks``), so the kernel attends over them
        as over an uncompacted sequence; the inputs themselves when the batch has no such row."""
        rows = [r for r in self.rows if r.live_dense]
        if not rows:
            return seq_lens, block_table
        seq_lens, block_table = seq_lens.clone(), block_table.clone()
        for r in rows:
            blocks = self.live_blocks[r.index]
            block_table[r.index, :blocks.numel()] = blocks.to(block_table.dtype)
            seq_lens[r.index] = r.read_len
        return seq_lens, block_table


def batch_counts(query_start_loc: list[int], seq_lens: list[int]) -> BatchCounts:
    prefill = decode = causal = 0
    for i, seq_len in enumerate(seq_lens):
        q_len = query_start_loc[i + 1] - query_start_loc[i]
        if q_len == 1:
            decode += 1
        else:
            prefill += q_len
        ctx = seq_len - q_len
        causal += q_len * ctx + q_len * (q_len + 1) // 2  # rows attend to ctx+1 .. ctx+q_len keys
    return BatchCounts(prefill, decode, causal)


def _row_is_sparse(policy: Policy, state: RequestState | None, row: RowPlan) -> bool:
    """A dense prefill row its policy computes under estimated patterns instead: the context before any
    question, from ``sparse_prefill_from`` tokens on, of a request that compacts (so its blocks past its
    prefix-cache hit never enter the prefix cache: the KV sparse prefill makes is no other request's)."""
    return (row.dense and state is not None and state.compaction is not None and row.read is None
            and not row.asks and row.context_len < state.prompt_len and row.q_len > 1
            and row.seq_len >= policy.sparse_prefill_from(state.prompt_len))


def _row_is_dense(policy: Policy, state: RequestState | None, row: RowPlan) -> bool:
    if policy.caps.attends_all:
        return True
    if policy.caps.evicts:  # full attention while the context is prefilled, until a prefill event compacted it
        return state is None or (row.context_len < state.prompt_len and row.read is None and not row.asks)
    return False


@dataclass(frozen=True)
class CompactionSetup:
    """Compaction is on (the scheduler frees compacted blocks): the facts the rule needs."""

    block_size: int
    num_kv_heads: int


def _plan_compaction(row: RowPlan, state: RequestState, policy: Policy, setup: CompactionSetup) -> None:
    """The row's live layout this step, and whether it is a compaction event (``compress.rule``).  The
    request's terms are fixed at its first step (its prefix-cache hit is known then); a request recomputed
    after preemption never compacts."""
    if state.restarts:
        return
    if not state.terms_known:
        state.terms_known = True
        state.compaction = compaction_terms(policy, state.prompt_len, state.first_context,
                                            setup.block_size, setup.num_kv_heads, state.question_at)
    terms = state.compaction
    if terms is None:
        return
    row.read = state.layout
    event = terms.event_in(row.context_len, row.seq_len)
    if event is None:
        return
    row.compact_tail = terms.tail_at(event)
    state.layout = terms.layout(row.compact_tail)


def _plan_records(store: ObservationStore, state: RequestState, row: RowPlan, policy: Policy) -> list[RecordJob]:
    """What a prefill row records: its prompt's observations, and with a question its context's.  Only
    context rows count for the prompt's (question rows attend through the context's keep-set, not as
    full attention does), so a request without a question that shares the prompt reads none of them.
    The chunk that ends what the policy will select from also runs its ``on_prompt_observed``."""
    col_sums = policy.caps.needs_col_sums
    hook = policy.on_prompt_observed if policy.observes_prompt_end() else None
    jobs = []
    end = min(row.seq_len, state.select_len)
    keys = (state.prompt_key,) if state.question_at is None else (state.prompt_key, state.context_key)
    for key, length in zip(keys, (state.prompt_len, state.select_len)):
        if row.context_len < end:
            job = plan_record(store.get(key, length), row.index, row.q_start, row.context_len, end - row.context_len,
                              col_sums, hook if key == state.obs_key else None)
            if job is not None:
                jobs.append(job)
    return jobs


def plan_batch(requests: RequestTable | None, resolver: PolicyResolver, store: ObservationStore,
               query_start_loc: list[int], seq_lens: list[int],
               compaction: CompactionSetup | None = None) -> BatchPlan:
    """Plan one batch from host lengths (``query_start_loc``: ``num_reqs + 1`` ints)."""
    num_reqs = len(seq_lens)
    states = requests.slots(num_reqs) if requests is not None else [None] * num_reqs
    rows, records = [], []
    for i, (state, seq_len) in enumerate(zip(states, seq_lens)):
        q_start, q_len = query_start_loc[i], query_start_loc[i + 1] - query_start_loc[i]
        if state is not None and q_len > 0 and state.advance(seq_len - q_len, seq_len):
            requests.restarted(state)
        policy, label = resolver.resolve(state.overrides) if state is not None else (resolver.default,
                                                                                     resolver.default_label)
        row = RowPlan(i, state, policy, label, q_start, q_len, seq_len, False)
        if compaction is not None and policy.caps.evicts and state is not None and q_len > 0:
            _plan_compaction(row, state, policy, compaction)
        row.dense = _row_is_dense(policy, state, row)
        if row.read is not None and state.compaction.prefill:  # every live column kept: dense over them,
            row.live_dense = True  # but for a decode event, whose own attention ranks what stays (in torch)
            row.dense = not (row.compact and row.context_len >= state.prompt_len)
        if _row_is_sparse(policy, state, row):
            row.dense, row.sparse = False, True
        if state is not None and state.prompt_key is not None and q_len > 0:
            if row.context_len < state.prompt_len:  # every prefill row records its prompt's observations
                records += _plan_records(store, state, row, policy)
            if row.evicting or (row.sparse and row.seq_len == state.select_len):
                # (a question's prefill rows too: recorded above, before attention; a sparse chunk that ends
                # what the policy selects from may reuse what the policy noted there)
                row.obs = store.peek(state.obs_key, state.select_len)
        rows.append(row)
    store.trim()
    return BatchPlan(rows, records, batch_counts(query_start_loc, seq_lens), resolver.num_layers)
