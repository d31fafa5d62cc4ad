"""`casakv eval quality`: every policy x budget on every task, through one real server, under two protocols.

One ``vllm serve --attention-backend casakv`` (dense by default, prefix caching
on) serves everything; each request picks its policy and budget through
``vllm_xargs`` (see :mod:`casakv_vllm.requests.params`).  Prompts are sent as
token ids (``tasks.prompt_ids``), the same for both protocols.

- ``aware``: the whole prompt (context and question) is prefilled, and the
  policy picks its keep-set from the prompt's last queries, the question's
  among them.
- ``agnostic``: the context is compressed before the question arrives (a
  document shared by several questions or turns): ``casakv_question_at`` names
  the question's first token, the policy picks its keep-set from the context's
  own last queries, and the question attends through that keep-set (it is kept
  whole).  Full attention, and a sample without a question (``longdoc``), are
  the same under both protocols: they run once.  ``+prefill`` configs (prefill
  compression) are evaluated under ``aware`` only.

Per sample and protocol:

1. one request prefills the prompt alone; every prefill records its prompt's
   observation window, whatever its policy, but only an H2O prefill adds every
   query's attention mass, so H2O goes first when it is evaluated.  Under
   ``agnostic`` that request is the context alone (one token generated), in a
   cache namespace of its own (``cache_salt``) once the prompt is cached, so it
   computes the context from scratch and records the context's observations,
   which the agnostic requests read (they are kept per prompt: the context's
   token ids);
2. the protocol's other requests then run concurrently; they hit the prefix
   cache (the agnostic ones up to the context's last full block: they compute
   their question themselves), so each costs little more than its decode steps.

Retrieval tasks are scored against their answers; ``longdoc`` against the
full-attention run of the same prompt (greedy agreement, and the KL of the
next-token distributions where both runs share their context).  KV kept is
measured, per task and protocol, from the server's ``casakv_decode_kv_tokens_*``
counters (read after each protocol's requests of a sample).
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

from casakv_vllm.tools.quality import scoring
from casakv_vllm.tools.quality.calibrate import complete
from casakv_vllm.tools.quality.tasks import Sample, prompt_ids

FULL = "full"
BASELINES = (FULL, "streaming", "snapkv", "h2o", "pyramidkv", "adakv", "static-heads")
#: every policy the table evaluates by default: the baselines and CASAK-V's own
POLICIES = (*BASELINES, "casakv")
PROTOCOLS = ("aware", "agnostic")
#: the protocol label of full attention's records (the same requests serve both protocols)
BOTH = "both"
#: a policy name ending so also compresses while the prompt is prefilled (``prefill_compression``): such a
#: request prefills its own prompt (a cache salt of its own), since a prefix-cache hit stays dense
PREFILL = "+prefill"
BUDGETS = ("128", "256", "512", "1024", "2x", "4x", "8x")
LOGPROBS = 5
#: seconds one request may take (a 4k-token H2O prefill on a shared 2-core machine takes minutes)
REQUEST_TIMEOUT = 3600.0
_METRIC = "casakv_decode_kv_tokens_{}_total"


def budget_fields(label: str) -> dict:
    """``"256"`` -> kv_budget 256; ``"4x"`` -> kv_ratio 0.25."""
    text = label.strip().lower()
    try:
        if text.endswith("x"):
            factor = float(text[:-1])
            if factor <= 1:
                raise ValueError
            return {"kv_ratio": round(1.0 / factor, 6)}
        tokens = int(text)
        if tokens < 1:
            raise ValueError
        return {"kv_budget": tokens}
    except ValueError:
        raise ValueError(f"budget {label!r}: give a token count (256) or a reduction factor > 1 (4x)") from None


@dataclass(frozen=True)
class EvalConfig:
    """One (policy, budget) cell of the table."""

    policy: str
    budget: str  # label: "256", "4x" or "full"
    params: tuple = ()  # policy_params as sorted items

    @property
    def is_full(self) -> bool:
        return self.policy == FULL

    @property
    def base_policy(self) -> str:
        return self.policy.removesuffix(PREFILL)

    @property
    def prefill(self) -> bool:
        return self.policy.endswith(PREFILL)

    def xargs(self) -> dict | None:
        if self.is_full:
            return None
        out = {"casakv_policy": self.base_policy}
        if self.prefill:
            out["casakv_prefill_compression"] = True
        out.update({f"casakv_{k}": v for k, v in budget_fields(self.budget).items()})
        if self.params:
            out["casakv_policy_params"] = json.dumps(dict(self.params), sort_keys=True)
        return out

    @property
    def metric_label(self) -> str:
        """The server's label for this config (``plan.policy_label``)."""
        if self.is_full:
            return "dense"
        (key, value), = budget_fields(self.budget).items()
        name = self.base_policy
        return f"{name}/{key}={value:g}" if isinstance(value, float) else f"{name}/{key}={value}"


def eval_configs(policies: Sequence[str], budgets: Sequence[str], heads_file: str | None = None) -> list[EvalConfig]:
    """The cells to run: full attention once, every other policy at every budget."""
    out = []
    for policy in policies:
        if policy == FULL:
            out.append(EvalConfig(FULL, FULL))
            continue
        params: dict = {}
        base = policy.removesuffix(PREFILL)
        if base == "streaming":
            params = {"scope": "decode"}  # evict after a full prefill, like the other baselines
        if base == "static-heads":
            if not heads_file:
                raise ValueError("static-heads needs a head assignment (--heads PATH; `casakv eval search-heads`)")
            params = {"assignment": heads_file}
        for budget in budgets:
            budget_fields(budget)
            out.append(EvalConfig(policy, budget, tuple(sorted(params.items()))))
    return out


@dataclass
class SampleResult:
    config: EvalConfig
    task: str
    sample_id: str
    score: float
    text: str
    extra: dict = field(default_factory=dict)
    protocol: str = "aware"


def _score(sample: Sample, out: dict, ref: dict | None) -> tuple[float, dict]:
    if sample.answer is not None:
        return scoring.score_retrieval(sample.task, out["text"], sample.answer), {}
    if ref is None:
        raise RuntimeError(f"casakv eval: {sample.task} is scored against full attention's output; evaluate full too")
    if out["tokens"] is None:
        return 1.0, {"kl": 0.0}
    agree = scoring.greedy_prefix_agreement(out["tokens"], ref["tokens"], sample.max_tokens)
    kl = scoring.mean_topk_kl(ref["top"], out["top"], ref["tokens"], out["tokens"])
    return agree, {"kl": kl, "token_agreement": scoring.token_agreement(out["tokens"], ref["tokens"])}


def run_protocol(server, sample: Sample, configs: list[EvalConfig], concurrency: int, ids: list[int],
                 question_at: int | None = None, cached: bool = False) -> dict[EvalConfig, dict]:
    """One protocol's requests of one sample, concurrently after one that fills the caches.

    Aware (``question_at`` None): the first config (H2O if evaluated, else another that records every prompt
    query's attention mass, else full attention) alone.  Agnostic: the context alone first (one token; the
    settings of such a config if evaluated, so it adds every context query's attention mass), which records
    the context's observations; when the prompt is ``cached`` already (the aware requests ran) it runs in a
    cache namespace of its own, so it computes the context from scratch.
    """
    logprobs = LOGPROBS if sample.answer is None else None
    h2o = next((c for c in configs if c.policy == "h2o"), None) or next(
        (c for c in configs if needs_col_sums(c)), None)

    def one(cfg: EvalConfig) -> dict:
        t0 = time.monotonic()
        out = complete(server, sample, logprobs, _extra(cfg, ids, question_at), REQUEST_TIMEOUT)
        return {**out, "seconds": round(time.monotonic() - t0, 2)}

    outs = {}
    if question_at is None:
        first = h2o or next((c for c in configs if c.is_full), configs[0])
        outs[first] = one(first)
    else:
        warm = {**(_extra(h2o) if h2o else {}), "prompt": ids[:question_at], "max_tokens": 1}
        if cached:
            warm["cache_salt"] = uuid.uuid4().hex
        complete(server, sample, None, warm, REQUEST_TIMEOUT)
    rest = [c for c in configs if c not in outs]
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        for cfg, out in zip(rest, pool.map(one, rest)):
            outs[cfg] = out
    return outs


def score_sample(sample: Sample, outs: dict[str, dict]) -> list[SampleResult]:
    """Results of one sample from each protocol's outputs (``outs[protocol][config]``); full attention runs
    under one protocol only, is scored as ``both`` and is ``longdoc``'s reference under either."""
    ref = next((o for by_cfg in outs.values() for c, o in by_cfg.items() if c.is_full), None)
    results = []
    for protocol, by_cfg in outs.items():
        for cfg, out in by_cfg.items():
            score, extra = _score(sample, out, ref)
            if "seconds" in out:  # the request's own wall time (queueing behind its concurrent ones included)
                extra["request_seconds"] = out["seconds"]
            results.append(SampleResult(cfg, sample.task, sample.id, score, out["text"], extra,
                                        BOTH if cfg.is_full else protocol))
    return results


def run_sample(server, sample: Sample, configs: list[EvalConfig], concurrency: int,
               protocols: tuple[str, ...] = ("aware",), tok=None,
               on_phase: Callable[[str, str | None], None] | None = None) -> list[SampleResult]:
    """Every config of one sample under each protocol.  ``on_phase(protocol, same_as)`` follows each
    protocol's requests; ``same_as`` names the protocol whose requests served it (a sample without a
    question: its agnostic cells are its aware ones)."""
    ids, question = prompt_ids(sample, tok)
    outs: dict[str, dict] = {}
    for protocol in protocols:
        agnostic = protocol == "agnostic"
        cells = [c for c in configs if not (outs and c.is_full) and not (agnostic and c.prefill)]
        if agnostic and question is None and outs:
            outs[protocol] = {c: o for c, o in outs["aware"].items() if c in cells}
            same_as = "aware"
        elif cells:
            outs[protocol] = run_protocol(server, sample, cells, concurrency, ids, question if agnostic else None,
                                          cached=bool(outs))
            same_as = None
        else:
            continue
        if on_phase:
            on_phase(protocol, same_as)
    return score_sample(sample, {p: {c: by[c] for c in configs if c in by} for p, by in outs.items()})


@functools.lru_cache(maxsize=None)
def needs_col_sums(cfg: EvalConfig) -> bool:
    """Whether ``cfg``'s policy records every prompt query's attention mass (H2O; casakv with
    ``context_votes``)."""
    if cfg.is_full or cfg.prefill:
        return False
    from casakv_vllm.config import CasakvConfig
    from casakv_vllm.policies import build_policy

    try:
        config = CasakvConfig(policy=cfg.base_policy, policy_params=dict(cfg.params), **budget_fields(cfg.budget))
        return build_policy(config).caps.needs_col_sums
    except (ValueError, TypeError):  # a policy that needs more than the cell names (static heads' file)
        return False


def _extra(cfg: EvalConfig, ids: list[int] | None = None, question_at: int | None = None) -> dict:
    xargs = cfg.xargs()
    if question_at is not None and xargs:
        xargs = {**xargs, "casakv_question_at": question_at}
    out = {"vllm_xargs": xargs} if xargs else {}
    if ids is not None:
        out["prompt"] = ids
    if cfg.prefill:
        out["cache_salt"] = uuid.uuid4().hex
    return out


def kv_counters(server, configs: list[EvalConfig]) -> dict[str, tuple[float, float]]:
    """``label -> (attended, causal)`` decode KV counters, once they settle."""
    import re

    server.metric_values(["casakv_forward_calls_total"])  # wait for the workers' last flush
    text = server.get_text("/metrics")
    out = {}
    for cfg in configs:
        vals = []
        for kind in ("attended", "causal"):
            pat = rf'^{_METRIC.format(kind)}\{{policy="{re.escape(cfg.metric_label)}"\}} ([0-9.e+-]+)$'
            m = re.search(pat, text, re.M)
            vals.append(float(m.group(1)) if m else 0.0)
        out[cfg.metric_label] = (vals[0], vals[1])
    return out


def aggregate(results: list[SampleResult], kv: dict[str, dict[str, list[float]]]) -> list[dict]:
    """Result records (one per config x protocol x task, plus ``longdoc_kl``) from one task's samples;
    ``kv[protocol][label]``: the decode KV counters ``[attended, causal]`` its requests added."""
    records = []
    cells: dict[tuple[EvalConfig, str], list[SampleResult]] = {}
    for r in results:
        cells.setdefault((r.config, r.protocol), []).append(r)
    for (cfg, protocol), rs in cells.items():
        att, cau = kv.get(protocol, {}).get(cfg.metric_label, (0.0, 0.0))
        ratio = 1.0 if cfg.is_full else (att / cau if cau > 0 else float("nan"))
        mean, lo, hi = scoring.mean_ci([r.score for r in rs])
        base = {"policy": cfg.policy, "budget": cfg.budget, "protocol": protocol, "kv_ratio": round(ratio, 4),
                "n": len(rs)}
        records.append({**base, "task": rs[0].task, "score": mean, "ci_low": lo, "ci_high": hi})
        if "kl" in rs[0].extra:
            kmean, klo, khi = scoring.mean_ci([r.extra["kl"] for r in rs])
            records.append({**base, "task": f"{rs[0].task}_kl", "score": kmean, "ci_low": klo, "ci_high": khi,
                            "lower_is_better": True})
    return records


class KvTally:
    """Decode KV counters per task and protocol: the server's counters are read after each protocol's
    requests of a sample, and the difference goes to that task and protocol."""

    def __init__(self, server, configs: list[EvalConfig]) -> None:
        self.server, self.configs = server, configs
        self.last = kv_counters(server, configs)
        self.counts: dict[tuple[str, str], dict[str, list[float]]] = {}
        self.latest: dict[str, tuple[float, float]] = {}

    def phase(self, task: str, protocol: str, same_as: str | None = None) -> None:
        if same_as is None:
            now = kv_counters(self.server, self.configs)
            self.latest = {k: (v[0] - self.last.get(k, (0.0, 0.0))[0], v[1] - self.last.get(k, (0.0, 0.0))[1])
                           for k, v in now.items()}
            self.last = now
        tally = self.counts.setdefault((task, protocol), {})
        for label, (att, cau) in self.latest.items():  # same_as: its requests were the previous phase's
            pair = tally.setdefault(label, [0.0, 0.0])
            pair[0] += att
            pair[1] += cau

    def of(self, task: str) -> dict[str, dict[str, list[float]]]:
        return {protocol: c for (t, protocol), c in self.counts.items() if t == task}


def run_quality(server, samples_by_task: dict[str, list[Sample]], configs: list[EvalConfig],
                concurrency: int = 8, progress: Callable[[int], None] | None = None,
                on_task_done: Callable[[str, list[dict]], None] | None = None,
                protocols: tuple[str, ...] = ("aware",), tok=None, deadline: float | None = None,
                on_round: Callable[[list[dict], list[dict]], None] | None = None) -> tuple[list[dict], list[dict]]:
    """Run everything, one sample of every task per round; returns ``(records, per-sample rows)``.

    ``deadline`` (a ``time.monotonic()`` value): no round starts after it, so a run cut short still has
    the same samples of every task.  ``on_round(records, rows)`` follows every round (partial results)."""
    kv = KvTally(server, configs)
    results: dict[str, list[SampleResult]] = {task: [] for task in samples_by_task}
    rows: list[dict] = []

    def records() -> list[dict]:
        return [r for task, res in results.items() if res for r in aggregate(res, kv.of(task))]

    for i in range(max((len(v) for v in samples_by_task.values()), default=0)):
        if i and deadline is not None and time.monotonic() > deadline:
            break
        for task, samples in samples_by_task.items():
            if i >= len(samples):
                continue
            t0 = time.monotonic()
            res = run_sample(server, samples[i], configs, concurrency, protocols, tok,
                             lambda protocol, same_as, task=task: kv.phase(task, protocol, same_as))
            results[task].extend(res)
            rows.extend({"task": r.task, "id": r.sample_id, "policy": r.config.policy, "budget": r.config.budget,
                         "protocol": r.protocol, "score": r.score, "text": r.text, **r.extra,
                         "seconds": round(time.monotonic() - t0, 2)} for r in res)
            if progress:
                progress(1)
        if on_round:
            on_round(records(), rows)
    out = records()
    if on_task_done:
        for task in samples_by_task:
            on_task_done(task, [r for r in out if r["task"] in (task, f"{task}_kl")])
    return out, rows
