"""``casakv eval patterns``: run the model over held-out prompts and measure the estimator on every layer.

The model runs in Hugging Face transformers on the CPU (fp32); hooks capture each layer's post-RoPE
queries and keys (``quality.search_heads.capture_qk``).  Prompts come from the quality suite's offline
tasks (``quality.tasks``), one task after another, with seeds ``HELD_OUT_SEED + i``: disjoint from the
suite's evaluation seeds (``--seed``, default 0) and from the static-heads calibration (1000 + i), and
never used to set the estimator's constants.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Callable

import torch

from casakv_vllm.tools.patterns.measure import STATIC, Variant, evaluate_chunk

HELD_OUT_SEED = 5000
LAST_Q = 64  # the queries serving records at the end of a prompt / chunk (``EstimatorConfig.last_q``)


def held_out_texts(n: int, context: int) -> list[dict]:
    """``n`` prompts of about ``context`` tokens: ``{"id", "task", "seed", "text"}``."""
    from casakv_vllm.tools.quality.tasks import TASKS, make_samples

    out = []
    for i in range(n):
        task = TASKS[i % len(TASKS)]
        s = make_samples(task, 1, seed=HELD_OUT_SEED + i, context_tokens=context)[0]
        out.append({"id": s.id, "task": task, "seed": HELD_OUT_SEED + i, "text": s.prompt})
    return out


def chunks(length: int, chunk: int | None, last_q: int = LAST_Q) -> list[tuple[int, int]]:
    """Query ranges ``(start, end)`` of a prompt of ``length`` tokens: the whole prompt (``chunk`` None), or
    prefill chunks of ``chunk`` tokens; chunks with no row before their last ``last_q`` are left out."""
    if chunk is None:
        return [(0, length)]
    return [(s, min(length, s + chunk)) for s in range(0, length, chunk) if min(length, s + chunk) - s > last_q]


def load(model_path: str):
    """``(model, tokenizer, softmax scale)``, fp32 on the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()  # one progress bar: the prompts'

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.eval()
    attn = model.model.layers[0].self_attn
    return model, tok, float(getattr(attn, "scaling", attn.head_dim ** -0.5))


def measure(model_path: str, prompts: list[dict], context: int, variants: list[Variant], chunk: int | None = None,
            rows: int = 0, static_density: float | None = None,
            progress: Callable[[dict], None] | None = None) -> tuple[list[dict], list[dict]]:
    """Per-head results and prompt facts.

    Returns:
        ``(heads, prompt_info)``: ``heads`` holds one dict per (mode, variant, prompt, chunk, layer, KV head):
        ``mode`` ("prompt": the whole prompt estimated once; "chunk": per prefill chunk of ``chunk``
        tokens), ``variant`` (``Variant.name`` or ``STATIC``), ``prompt``, ``chunk``, ``layer``, ``head``,
        ``program``, ``recall``, ``density``, ``est_recall``.
    """
    from casakv_vllm.tools.quality.search_heads import capture_qk

    model, tok, scale = load(model_path)
    modes = [("prompt", None)] + ([("chunk", chunk)] if chunk is not None else [])
    heads, info = [], []
    for pi, prompt in enumerate(prompts):
        t0 = time.monotonic()
        ids = tok(prompt["text"], return_tensors="pt").input_ids[:, :context]
        length = ids.shape[1]
        per_layer = capture_qk(model, ids)
        t_model = time.monotonic() - t0
        for layer, (q, k) in enumerate(per_layer):
            for mode, size in modes:
                for ci, (start, end) in enumerate(chunks(length, size)):
                    check = layer == pi % len(per_layer) and ci == 0  # one layer a prompt, in turn
                    res = evaluate_chunk(q, k, start, end, scale, variants, rows, LAST_Q,
                                         static_density if mode == "prompt" else None, check)
                    for name, r in res.items():
                        for h, fields in enumerate(zip(r.program, r.recall, r.density, r.est_recall)):
                            heads.append({"mode": mode, "variant": name, "prompt": pi, "chunk": ci, "layer": layer,
                                          "head": h, **dict(zip(("program", "recall", "density", "est_recall"),
                                                                fields))})
        del per_layer
        info.append({"id": prompt["id"], "task": prompt["task"], "seed": prompt["seed"], "tokens": length,
                     "model_seconds": round(t_model, 1), "seconds": round(time.monotonic() - t0, 1)})
        if progress:
            progress(info[-1])
    return heads, info


def settings(variants: list[Variant], **kw) -> dict:
    return {"variants": [asdict(v) | {"name": v.name} for v in variants], "last_q": LAST_Q,
            "held_out_seed": HELD_OUT_SEED, "static": STATIC, **kw}
