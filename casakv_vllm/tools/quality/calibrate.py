"""Calibrate the quality tasks against a dense (full attention) server.

    python -m casakv_vllm.tools.quality.calibrate --tasks passkey,copy --lengths 2048,4096 -n 10
    python -m casakv_vllm.tools.quality.calibrate --url http://127.0.0.1:PORT ...   # reuse a server

Without ``--url`` it starts ``vllm serve <demo model> --attention-backend
casakv`` (dense policy) on loopback, runs every (task, length), prints one line
per cell (mean score, 95% CI, seconds) and stops the server.  ``longdoc`` has no
answer: it is run twice and scored dense-vs-dense (greedy agreement and top-k
KL), which measures the run-to-run noise floor of the fidelity scores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

from casakv_vllm.tools.quality import scoring
from casakv_vllm.tools.quality.tasks import TASKS, Sample, make_samples

SERVER_ARGS = ["--max-model-len", "8192", "--dtype", "bfloat16", "--max-num-batched-tokens", "2048",
               "--max-num-seqs", "8"]


def complete(server, sample: Sample, logprobs: int | None = None, extra: dict | None = None,
             timeout: float | None = None) -> dict:
    """Greedy /v1/completions of one sample: {text, tokens, top (list of {token: logprob})}."""
    payload = {"model": server.served_name, "prompt": sample.prompt, "max_tokens": sample.max_tokens,
               "temperature": 0.0, **(extra or {})}
    if logprobs:
        payload["logprobs"] = logprobs
    choice = server.post("/v1/completions", payload, **({"timeout": timeout} if timeout else {}))["choices"][0]
    out = {"text": choice["text"], "tokens": None, "top": None}
    if logprobs and choice.get("logprobs"):
        out["tokens"] = choice["logprobs"]["tokens"]
        out["top"] = choice["logprobs"]["top_logprobs"]
    return out


def evaluate(server, samples: list[Sample], concurrency: int = 2, logprobs: int = 5) -> list[dict]:
    """One record per sample: retrieval tasks scored against the answer;
    ``longdoc`` run twice and scored dense-vs-dense."""
    def one(s: Sample) -> dict:
        t0 = time.monotonic()
        if s.answer is not None:
            r = complete(server, s)
            return {"id": s.id, "task": s.task, "text": r["text"], "answer": s.answer,
                    "score": scoring.score_retrieval(s.task, r["text"], s.answer),
                    "seconds": time.monotonic() - t0, "meta": s.meta}
        a, b = complete(server, s, logprobs), complete(server, s, logprobs)
        return {"id": s.id, "task": s.task, "text": a["text"], "answer": None,
                "score": scoring.greedy_prefix_agreement(b["tokens"], a["tokens"], s.max_tokens),
                "token_agreement": scoring.token_agreement(b["tokens"], a["tokens"]),
                "kl": scoring.mean_topk_kl(a["top"], b["top"], a["tokens"], b["tokens"]),
                "seconds": time.monotonic() - t0, "meta": s.meta}

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(one, samples))


def summarize(records: list[dict]) -> dict:
    mean, lo, hi = scoring.mean_ci([r["score"] for r in records])
    out = {"score": mean, "ci_low": lo, "ci_high": hi, "n": len(records)}
    if records and "kl" in records[0]:
        out["kl"] = sum(r["kl"] for r in records) / len(records)
        out["token_agreement"] = sum(r["token_agreement"] for r in records) / len(records)
    return out


class _Remote:
    """The HTTP half of ``VllmServer`` for a server started elsewhere."""

    def __init__(self, url: str, served_name: str = "demo"):
        from casakv_vllm.tools.serving import VllmServer

        self._s = VllmServer(model="", port=urlparse(url).port, served_name=served_name)
        self.served_name = served_name

    def post(self, path, payload, timeout=600.0):
        return self._s.post(path, payload, timeout=timeout)


def start_dense_server(model: str | None = None, extra_args: list[str] | None = None):
    from casakv_vllm.tools.demo_model import ensure_demo_model
    from casakv_vllm.tools.serving import VllmServer, cpu_env

    env = {**cpu_env(4), "VLLM_CPU_CI_ENV": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    return VllmServer(model=model or str(ensure_demo_model()), attention_backend="casakv",
                      extra_args=SERVER_ARGS + list(extra_args or []), env=env).start()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--lengths", default="2048,4096", help="context tokens, comma-separated")
    ap.add_argument("-n", type=int, default=10, help="samples per (task, length)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--url", help="use a running server instead of starting one")
    ap.add_argument("--model", help="model folder (default: the demo model)")
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--json", help="write all records and summaries here")
    ap.add_argument("--show", type=int, default=0, help="print this many generations per cell")
    args = ap.parse_args(argv)

    server = _Remote(args.url) if args.url else start_dense_server(args.model)
    cells, started = [], time.monotonic()
    try:
        for task in args.tasks.split(","):
            for length in (int(x) for x in args.lengths.split(",")):
                samples = make_samples(task, args.n, args.seed, length)
                t0 = time.monotonic()
                recs = evaluate(server, samples, args.concurrency)
                summ = {"task": task, "context_tokens": length, **summarize(recs),
                        "seconds": round(time.monotonic() - t0, 1)}
                cells.append({**summ, "records": recs})
                extra = (f"  kl={summ['kl']:.4f} tok_agree={summ['token_agreement']:.3f}"
                         if "kl" in summ else "")
                print(f"{task:9s} {length:5d}  score={summ['score']:.3f} "
                      f"[{summ['ci_low']:.3f}, {summ['ci_high']:.3f}] n={summ['n']}{extra}  "
                      f"{summ['seconds']:.0f}s", flush=True)
                for r in recs[: args.show]:
                    print(f"    {r['id']} want={r['answer']!r} got={r['text'][:80]!r} score={r['score']:.2f}")
    finally:
        if not args.url:
            server.stop()
    print(f"total {time.monotonic() - started:.0f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{k: v for k, v in c.items()} for c in cells], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
