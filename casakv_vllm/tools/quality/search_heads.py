"""Offline search of the static per-head pattern assignment (MInference-style).

For each calibration prompt, the model runs once (Hugging Face transformers,
CPU) with hooks that capture every layer's post-RoPE queries and keys.  The
prompt is split as a request would be: the first ``L - GAP - E`` tokens are
the "prompt" whose last 64 queries choose the keep-set (as the
``static-heads`` policy does at decode); the last ``E`` queries, ``GAP``
tokens later, play decode steps well into the generation (a keep-set must
serve the future, not only the question that chose it).  A head's *recall*
for a pattern type is the share of those queries' attention on prompt tokens
that falls on kept prompt tokens.  Each (layer, KV head) gets the type
with the highest mean recall over the calibration prompts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Sequence

import torch

from casakv_vllm.observe.store import LayerObservation
from casakv_vllm.ops.probs import attention_probs, group_sum
from casakv_vllm.policies.scorers import ScoreInput, window_scores
from casakv_vllm.policies.selection import select_top
from casakv_vllm.policies.static_heads import HEAD_TYPES, type_scores

EVAL_QUERIES = 32
GAP = 224
OBS = 64


def capture_qk(model, input_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Post-RoPE ``(q [H, L, D], k [Hkv, L, D])`` of every layer for one sequence."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = []
    for idx, layer in enumerate(model.model.layers):
        attn = layer.self_attn

        def hook(module, args, kwargs, idx=idx):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = kwargs["position_embeddings"]
            shape = (*hidden.shape[:-1], -1, module.head_dim)
            q = module.q_proj(hidden).view(shape).transpose(1, 2)
            k = module.k_proj(hidden).view(shape).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            captured[idx] = (q[0].float(), k[0].float())

        hooks.append(attn.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=input_ids, logits_to_keep=1)  # no logits over the vocabulary for every token
    finally:
        for h in hooks:
            h.remove()
    return [captured[i] for i in range(len(captured))]


def head_recalls(q: torch.Tensor, k: torch.Tensor, budget_fraction: float, scale: float) -> torch.Tensor:
    """Recall ``[num_types, num_kv_heads]`` of each pattern type on one sequence."""
    num_kv = k.shape[0]
    length = q.shape[1]
    plen = length - EVAL_QUERIES - GAP
    budget = max(1, math.ceil(budget_fraction * plen))
    w = min(OBS, plen)
    obs = LayerObservation(q[:, plen - w:plen].clone(), [True] * w)
    scores = window_scores(ScoreInput(0, k[:, :plen], obs, scale, budget, "search-heads"), OBS)
    probs = attention_probs(q[:, -EVAL_QUERIES:], k[:, :plen], torch.full((EVAL_QUERIES,), plen), scale)
    mass = group_sum(probs, num_kv).sum(1)  # [Hkv, plen]: decode queries' attention on prompt keys
    total = mass.sum(1).clamp_min(1e-9)
    out = torch.zeros(len(HEAD_TYPES), num_kv)
    for t, kind in enumerate(HEAD_TYPES):
        for h in range(num_kv):
            keep = select_top(type_scores(kind, scores[h], plen, budget).unsqueeze(0), budget)[0]
            out[t, h] = mass[h][keep].sum() / total[h]
    return out


def search(model_path: str, texts: Sequence[str], budget_fraction: float = 0.125,
           progress: Callable[[int], None] | None = None) -> dict:
    """Assignment dict (``heads[layer][kv_head]``) plus the recalls behind it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.eval()
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    scale = head_dim ** -0.5
    sums = None
    for text in texts:
        ids = tok(text, return_tensors="pt").input_ids[:, : cfg.max_position_embeddings]
        per_layer = [head_recalls(q, k, budget_fraction, scale) for q, k in capture_qk(model, ids)]
        rec = torch.stack(per_layer)  # [layers, types, Hkv]
        sums = rec if sums is None else sums + rec
        if progress:
            progress(1)
    mean = sums / len(texts)
    best = mean.argmax(1)  # [layers, Hkv]
    heads = [[HEAD_TYPES[int(t)] for t in row] for row in best]
    return {
        "model": str(model_path),
        "budget_fraction": budget_fraction,
        "calibration_prompts": len(texts),
        "types": list(HEAD_TYPES),
        "heads": heads,
        "recall": [[[round(float(x), 4) for x in mean[layer, t]] for t in range(len(HEAD_TYPES))]
                   for layer in range(mean.shape[0])],
    }


def write_assignment(result: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path
