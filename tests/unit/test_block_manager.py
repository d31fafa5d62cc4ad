"""Property test of the block-manager plugin: vLLM's real KV-cache manager, block pool and
requests, with ``CompressingManager`` in it, driven by random schedules (allocate, append, compress,
preempt, abort, finish, prefix hits).  After every step: no block is both free and in use,
reference counts balance, no live logical position maps to a freed block, the freed ranges are the
rule's; when every request has ended, every block is free again."""

import random

import pytest
import torch

pytest.importorskip("vllm")

from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.utils.hashing import sha256  # noqa: E402
from vllm.v1.core.kv_cache_manager import KVCacheManager  # noqa: E402
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec  # noqa: E402
from vllm.v1.request import Request, RequestStatus  # noqa: E402

from casakv_vllm.config import CasakvConfig  # noqa: E402
from casakv_vllm.integration.kv_manager import CompressingManager, question_cap  # noqa: E402
from casakv_vllm.integration.scheduler import use_compressing_manager  # noqa: E402
from casakv_vllm.requests.resolve import PolicyResolver  # noqa: E402

BS = 16
POLICIES = [None, {"casakv_policy": "snapkv", "casakv_kv_budget": 40}, {"casakv_policy": "snapkv",
            "casakv_kv_ratio": 0.3}, {"casakv_policy": "pyramidkv", "casakv_kv_ratio": 0.5},
            {"casakv_policy": "h2o", "casakv_kv_budget": 48, "casakv_chunk_size": 16},
            {"casakv_policy": "streaming", "casakv_kv_budget": 40, "casakv_chunk_size": 24,
             "casakv_policy_params": {"scope": "decode"}}, {"casakv_policy": "streaming", "casakv_kv_budget": 40},
            {"casakv_policy": "snapkv", "casakv_kv_ratio": 0.25, "casakv_chunk_size": 32,
             "casakv_prefill_compression": True}]


class Sim:
    """A small synchronous scheduler around vLLM's KVCacheManager (chunked prefill, decode)."""

    def __init__(self, rng: random.Random, num_blocks: int, chunk: int, policies=POLICIES, max_tokens=120,
                 questions: bool = False):
        use_compressing_manager(None)
        spec = FullAttentionSpec(block_size=BS, num_kv_heads=2, head_size=8, dtype=torch.float32)
        config = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                               kv_cache_groups=[KVCacheGroupSpec(["model.layers.0.self_attn.attn"], spec)])
        self.kv = KVCacheManager(config, max_model_len=2048, scheduler_block_size=BS, hash_block_size=BS,
                                 enable_caching=True)
        self.manager = self.kv.coordinator.single_type_managers[0]
        assert isinstance(self.manager, CompressingManager)
        self.requests: dict[str, Request] = {}
        self.events = 0  # frees of a later compaction event (a generated chunk)
        self.manager.attach(self.requests, PolicyResolver(CasakvConfig(), 4), self._freed)
        self.processed: dict[str, int] = {}  # processed tokens the last allocation saw, per request
        init_none_hash(sha256)
        self.hasher = get_request_block_hasher(BS, sha256)
        self.rng, self.chunk, self.num_blocks = rng, chunk, num_blocks
        self.policies, self.max_tokens, self.questions = policies, max_tokens, questions
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.prefixes = [[rng.randrange(1000) for _ in range(rng.choice([32, 48, 100]))] for _ in range(3)]
        self.ids = 0

    def _freed(self, freed: int, held: int, dense: int, first: bool) -> None:
        assert 0 < freed and held <= dense
        self.events += not first

    def add(self) -> None:
        rng = self.rng
        prompt = list(rng.choice(self.prefixes)) if rng.random() < 0.6 else []
        prompt += [rng.randrange(1000) for _ in range(rng.randrange(8, 400))]
        xargs = rng.choice(self.policies)
        if self.questions and xargs is not None and rng.random() < 0.7:  # a question at the prompt's end
            xargs = {**xargs, "casakv_question_at": max(1, len(prompt) - rng.randrange(1, 60))}
        params = SamplingParams(max_tokens=rng.randrange(1, self.max_tokens), extra_args=xargs)
        req = Request(f"r{self.ids}", prompt, params, None, block_hasher=self.hasher)
        self.ids += 1
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def end(self, req: Request) -> None:
        self.kv.free(req)
        self.running.remove(req)
        del self.requests[req.request_id]

    def preempt(self, req: Request) -> None:
        if self.manager._terms_of(req.request_id) is not None:  # what CasakvScheduler does
            req.skip_reading_prefix_cache = True
        self.kv.free(req)
        self.running.remove(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.PREEMPTED
        self.waiting.insert(0, req)

    def step(self) -> None:
        for req in list(self.running):  # every running request: its next chunk or one decode token
            if req not in self.running:  # preempted for an earlier one this step
                continue
            todo = req.num_tokens - req.num_computed_tokens
            n = min(todo, self.chunk) if todo > 1 else 1
            self.processed[req.request_id] = req.num_computed_tokens
            if self.kv.allocate_slots(req, n) is None:
                self.preempt(self.running[-1])
                continue
            req.num_computed_tokens += n
            if req.num_computed_tokens >= req.num_tokens:  # sampled a token
                req.append_output_token_ids(self.rng.randrange(1000))
                if len(req.output_token_ids) >= req.sampling_params.max_tokens:
                    self.end(req)
        for req in list(self.waiting):
            blocks, hit, _ = self.kv.get_computed_blocks(req)
            cap = question_cap(req, BS)  # what CasakvScheduler does: a question is computed, never a hit
            if cap is not None and hit > cap:
                blocks, hit = self.kv.truncate_computed_blocks(blocks, cap), cap
            n = min(req.num_tokens - hit, self.chunk)
            if self.kv.allocate_slots(req, n, hit, blocks) is None:
                break
            self.waiting.remove(req)
            req.status = RequestStatus.RUNNING
            req.num_computed_tokens = hit + n
            self.running.append(req)

    def check(self) -> None:
        pool = self.kv.block_pool
        free_ids = {b.block_id for b in pool.free_block_queue.get_all_free_blocks()}
        holders: dict[int, int] = {}
        for rid, blocks in self.manager.req_to_blocks.items():
            for b in blocks:
                if not b.is_null:
                    holders[b.block_id] = holders.get(b.block_id, 0) + 1
            life = self.manager._lives.get(rid)
            nulls = [i for i, b in enumerate(blocks) if b.is_null]
            if life is not None and life.freed_to >= 0:  # the rule's range, up to the latest settled event
                assert life.freed_to * BS == life.terms.settled_tail(self.processed[rid])
                assert nulls == list(range(life.terms.head_end // BS, life.freed_to)), (rid, nulls, life.terms)
            else:
                assert not nulls, rid
            cap = question_cap(self.requests[rid], BS)
            if cap is not None:  # a question's blocks never enter the prefix cache
                assert all(b.block_hash is None for b in blocks[cap // BS:] if not b.is_null), rid
        assert not free_ids & set(holders), "a block is both free and in use"
        for block in pool.blocks:
            if not block.is_null:
                assert block.ref_cnt == holders.get(block.block_id, 0), (block.block_id, block.ref_cnt)
        assert len(free_ids) + len(holders) == self.num_blocks - 1  # every block but the null one


def _run(sim: Sim, rng: random.Random, steps: int = 250) -> None:
    for _ in range(steps):
        if rng.random() < 0.3 and len(sim.requests) < 12:
            sim.add()
        if sim.running and rng.random() < 0.03:
            sim.end(rng.choice(sim.running))  # abort, mid-prefill or mid-decode
        sim.step()
        sim.check()
    while sim.requests:  # drain: abort whatever is left
        for req in list(sim.running):
            sim.end(req)
        for req in list(sim.waiting):
            sim.waiting.remove(req)
            sim.kv.free(req)
            del sim.requests[req.request_id]
        sim.check()
    assert sim.manager.live_requests() == 0
    assert sim.kv.block_pool.get_num_free_blocks() == sim.num_blocks - 1


@pytest.mark.parametrize("seed", range(12))
def test_random_schedules_keep_the_pool_consistent(seed):
    rng = random.Random(seed)
    sim = Sim(rng, num_blocks=rng.choice([60, 120, 400]), chunk=rng.choice([32, 64, 256]))
    _run(sim, rng)
    assert sim.manager.blocks_freed > 0  # every schedule compacted something


@pytest.mark.parametrize("seed", range(4))
def test_random_schedules_with_questions(seed):
    """Requests whose question starts near their prompt's end (``casakv_question_at``): the rule keeps the
    question's blocks, and none of them is cached or read from the cache."""
    rng = random.Random(300 + seed)
    sim = Sim(rng, num_blocks=rng.choice([120, 400]), chunk=rng.choice([32, 256]), policies=POLICIES[:7],
              questions=True)
    _run(sim, rng)
    assert sim.manager.blocks_freed > 0


@pytest.mark.parametrize("seed", range(3))
def test_long_generations_free_a_chunk_at_each_event(seed):
    """Only requests that compact while generating, with generations of many chunks."""
    rng = random.Random(100 + seed)
    sim = Sim(rng, num_blocks=200, chunk=64, policies=POLICIES[4:6], max_tokens=300)
    _run(sim, rng, steps=400)
    assert sim.events > 3


@pytest.mark.parametrize("seed", range(3))
def test_prefill_compression_frees_while_the_prompt_is_prefilled(seed):
    """Requests that compress while their prompt is prefilled never hold much more than their region,
    one compression chunk and one scheduling chunk."""
    rng = random.Random(200 + seed)
    sim = Sim(rng, num_blocks=300, chunk=64, policies=POLICIES[-1:])
    peak = {}
    for _ in range(300):
        if rng.random() < 0.3 and len(sim.requests) < 8:
            sim.add()
        sim.step()
        sim.check()
        for rid, blocks in sim.manager.req_to_blocks.items():
            life = sim.manager._lives.get(rid)
            if life is not None and life.terms is not None:
                held = sum(not b.is_null for b in blocks)
                peak[rid] = (max(peak.get(rid, (0, 0))[0], held), life.terms.prompt_len)
                assert held * BS <= life.terms.peak_tokens(sim.chunk), (rid, held, life.terms)
    assert sim.manager.blocks_freed > 0
    assert any(held * BS < prompt_len for held, prompt_len in peak.values())  # never held the whole prompt


def test_admission_reserves_what_a_prefill_compressing_request_holds_at_most():
    """A waiting request that compresses its prompt while prefilling is admitted with fewer free blocks than
    its prompt needs (vLLM's full-sequence check asks the manager); a dense one is not."""
    rng = random.Random(7)
    sim = Sim(rng, num_blocks=40, chunk=64)  # 39 usable blocks = 624 tokens
    prompt = [rng.randrange(1000) for _ in range(1000)]
    for xargs, admitted in ((None, False), (POLICIES[-1], True)):
        req = Request(f"adm{admitted}", prompt, SamplingParams(max_tokens=4, extra_args=xargs), None,
                      block_hasher=sim.hasher)
        sim.requests[req.request_id] = req
        got = sim.kv.allocate_slots(req, 64, full_sequence_must_fit=True)
        assert (got is not None) == admitted
        if got is not None:
            sim.kv.free(req)
        del sim.requests[req.request_id]
