"""Offline, seeded long-context tasks for ``casakv eval quality``.

Nothing is downloaded.  Filler and long documents are English prose from
Python's own documentation, ``pydoc_data.topics`` (the Language Reference as
plain text, ~465k characters, part of every CPython install).  Everything
random comes from ``random.Random`` seeded by a string built from
(task, seed, context length, sample index), so a sample never depends on how
many others were made.

Every prompt is a *raw completion prompt* for ``/v1/completions`` (no chat
template): each ends in a strong cue ("The vault passcode is") that the answer
completes, which the 135M demo model follows far better than a chat question.
A retrieval prompt is a context (instructions, filler, what is asked about)
followed by its question (the tail from the blank line before "What is ..." on):
``Sample.question_start`` is where the question begins, so the question-agnostic
protocol can compress the context before the question arrives (``prompt_ids``).

Tasks (``TASKS``):

- ``passkey``: a 5-digit vault passcode stated once at a depth in 0.1..0.9
  of the filler; the prompt ends "The vault passcode is".
- ``multikey``: four "The <frame> of the <color> <animal> is <5 digits>."
  lines (frames: secret code, locker number, ...) scattered through the
  filler; one of them is asked for with its own frame as the cue.
- ``copy``: a made-up 10-word sentence between [QUOTE n] ... [/QUOTE] at a
  depth in 0.1..0.9; the prompt ends "[QUOTE n] The" and the model repeats it.
- ``fewshot``: "Input: w / Output: w <tag>" examples spread over the first
  60% of the context, with a made-up tag word; the query is a new word.
- ``longdoc``: a contiguous stretch of the documentation; no answer, scored by
  fidelity to full attention (``scoring.greedy_agreement``, ``scoring.topk_kl``).
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass, field
from typing import Any

TASKS = ("passkey", "multikey", "copy", "fewshot", "longdoc")
RETRIEVAL_TASKS = ("passkey", "multikey", "copy", "fewshot")

#: context length (prompt tokens) used when ``make_samples(..., context_tokens=None)``.
#: Retrieval at 2048, where dense attention passes (docs/quality-calibration.md); fidelity at 4096.
DEFAULT_CONTEXT = {"passkey": 2048, "multikey": 2048, "copy": 2048, "fewshot": 2048, "longdoc": 4096}
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)

COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "silver", "golden", "black", "white",
          "pink", "brown", "gray", "crimson", "violet", "amber")
ANIMALS = ("falcon", "tiger", "otter", "badger", "whale", "parrot", "wolf", "rabbit", "turtle", "eagle",
           "dolphin", "fox", "panda", "camel", "lizard", "heron", "beaver", "moose")
OBJECTS = ("lantern", "piano", "basket", "ladder", "blanket", "mirror", "kettle", "bicycle", "violin",
           "umbrella", "compass", "candle")
PLACES = ("old bridge", "quiet harbor", "train station", "village square", "river bank", "city library",
          "mountain cabin", "small bakery", "market hall", "stone tower")
VERBS = ("sleeps", "waits", "sings", "dances", "hides", "reads", "sits", "plays")
WORDS = ("garden", "window", "pencil", "river", "castle", "forest", "bottle", "mountain", "carpet", "rocket",
         "button", "jacket", "island", "pillow", "ticket", "bridge", "rabbit", "orange", "hammer", "planet",
         "cookie", "doctor", "engine", "flower", "guitar", "helmet", "kitten", "ladder", "marble", "needle",
         "office", "pepper", "puzzle", "saddle", "shadow", "spider", "summer", "tunnel", "wallet", "winter")
# ("vanto" was dropped: the model copied it as "vanth"/"vante" every time)
TAGS = ("zorp", "blick", "quill", "drax", "mippo", "snarf", "tebba", "grulk", "fenwa", "plonk",
        "wizzle")


@dataclass(frozen=True)
class Sample:
    task: str
    id: str
    prompt: str  # raw completion prompt for /v1/completions
    answer: str | None  # None: fidelity-only (longdoc)
    max_tokens: int
    meta: dict[str, Any] = field(default_factory=dict)
    question_start: int | None = None  # character where the question begins (None: no question, e.g. longdoc)


# ---- text sources ------------------------------------------------------------

def _prose(text: str) -> list[str]:
    """Paragraphs of running English from a pydoc topic: unwrapped, without
    headings, code, lists and tables."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.split("\n")
        if any(ln.startswith((" ", "\t", ">>>", "*", "+", "=", "-", "|")) for ln in lines):
            continue
        para = " ".join(ln.strip() for ln in lines)
        if len(para) >= 160 and para[0].isupper() and para.rstrip()[-1] in ".:" and para.count(". ") >= 1:
            out.append(para)
    return out


@functools.lru_cache(maxsize=1)
def corpus_paragraphs() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    return tuple(p for key in sorted(topics) for p in _prose(topics[key]))


@functools.lru_cache(maxsize=2)
def tokenizer(model: str | None = None):
    from transformers import AutoTokenizer

    if model is None:
        from casakv_vllm.tools.demo_model import ensure_demo_model

        model = str(ensure_demo_model())
    return AutoTokenizer.from_pretrained(model)


def count_tokens(text: str) -> int:
    return len(tokenizer()(text, add_special_tokens=False)["input_ids"])


@functools.lru_cache(maxsize=1)
def _paragraph_tokens() -> tuple[int, ...]:
    tok = tokenizer()
    return tuple(len(ids) for ids in tok(list(corpus_paragraphs()), add_special_tokens=False)["input_ids"])


def filler(rng: random.Random, n_tokens: int) -> list[str]:
    """Consecutive corpus paragraphs (wrapping around) from a random start,
    about ``n_tokens`` tokens in all (+2 per paragraph break)."""
    paras, counts = corpus_paragraphs(), _paragraph_tokens()
    i, total, out = rng.randrange(len(paras)), 0, []
    while total < n_tokens:
        out.append(paras[i % len(paras)])
        total += counts[i % len(paras)] + 2
        i += 1
    return out


def insert_at_depths(paras: list[str], items: list[tuple[float, str]]) -> list[str]:
    """Insert each (depth, text) as its own paragraph at that fraction of the
    filler's length in characters (a good proxy for tokens within one corpus)."""
    cum, pos = [0], 0
    for p in paras:
        pos += len(p) + 2
        cum.append(pos)
    inserts: dict[int, list[str]] = {}
    for depth, text in items:
        k = min(range(len(cum)), key=lambda j: abs(cum[j] - depth * cum[-1]))
        inserts.setdefault(k, []).append(text)
    out = []
    for j in range(len(paras) + 1):
        out += inserts.get(j, [])
        if j < len(paras):
            out.append(paras[j])
    return out


def _build(rng, context_tokens: int, head: str, items: list[tuple[float, str]], tail: str) -> str:
    """head + filler with ``items`` inserted + tail, about ``context_tokens`` tokens."""
    fixed = count_tokens(head + tail + " ".join(t for _, t in items)) + 4 * len(items) + 8
    paras = filler(rng, max(0, context_tokens - fixed))
    # trim the last paragraph so the total lands near the target
    body = insert_at_depths(paras, items)
    text = head + "\n\n".join(body) + tail
    excess = count_tokens(text) - context_tokens
    if excess > 0:
        last = paras[-1]
        ids = tokenizer()(last, add_special_tokens=False)["input_ids"]
        cut = tokenizer().decode(ids[: max(1, len(ids) - excess)])
        cut = (cut[: cut.rfind(" ")] if " " in cut else cut).rstrip(".,;:") + "."
        body[body.index(last)] = cut
        text = head + "\n\n".join(body) + tail
    return text


def _rng(task: str, seed: int, context: int, i: int) -> random.Random:
    return random.Random(f"casakv-quality:{task}:{seed}:{context}:{i}")


# ---- tasks -------------------------------------------------------------------

def _passkey(rng, ctx, i):
    key = str(rng.randrange(10000, 100000))
    depth = DEPTHS[i % len(DEPTHS)]
    # "vault passcode": words absent from the filler ("pass" made the model
    # drift into the docs' "pass" statement)
    head = ("There is a vault passcode hidden inside the following text. Find it and remember it. "
            "I will ask you for the vault passcode at the end.\n\n")
    needle = f"The vault passcode is {key}. Remember it. {key} is the vault passcode."
    tail = "\n\nWhat is the vault passcode? The vault passcode is"
    return _build(rng, ctx, head, [(depth, needle)], tail), key, 8, {"depth": depth, "question_chars": len(tail)}


KEY_TEMPLATES = ("The secret code for the {} is", "The locker number of the {} is",
                 "The ticket number of the {} is", "The account number of the {} is",
                 "The lucky number of the {} is", "The serial number of the {} is")


def _multikey(rng, ctx, i, n_keys: int = 4):
    # distinct colors, animals and sentence frames: keys share no cue word
    # (with one frame for all, the 135M model often returned a neighbour's code)
    names = [f"{c} {a}" for c, a in zip(rng.sample(COLORS, n_keys), rng.sample(ANIMALS, n_keys))]
    frames = rng.sample(KEY_TEMPLATES, n_keys)
    codes = [str(rng.randrange(10000, 100000)) for _ in names]
    depths = sorted(rng.uniform(0.05, 0.95) for _ in names)
    q = i % n_keys  # which key is asked (its rank in depth order)
    head = "The following text contains several secret numbers. Remember each of them.\n\n"
    items = [(d, f"{f.format(n)} {c}.") for d, f, n, c in zip(depths, frames, names, codes)]
    cue = frames[q].format(names[q])
    tail = f"\n\nQuestion: {cue.replace('The', 'what is the', 1)[:-3]}? {cue}"
    return _build(rng, ctx, head, items, tail), codes[q], 8, {"depth": round(depths[q], 3), "n_keys": n_keys,
                                                              "question_chars": len(tail)}


def _copy(rng, ctx, i):
    sentence = (f"{rng.choice(COLORS)} {rng.choice(ANIMALS)} {rng.choice(VERBS)} "
                f"beside the {rng.choice(OBJECTS)} in the {rng.choice(PLACES)}.")
    qid = rng.randrange(1000, 10000)
    depth = DEPTHS[i % len(DEPTHS)]
    head = "Somewhere in the following text there is a numbered quotation between [QUOTE] and [/QUOTE].\n\n"
    # the prompt ends with the quote's number and first word: a unique cue
    # (after a bare "[QUOTE]" the model often wandered off into the filler)
    tail = f"\n\nRepeat quotation {qid} exactly.\n\n[QUOTE {qid}] The"
    items = [(depth, f"[QUOTE {qid}] The {sentence} [/QUOTE]")]
    return _build(rng, ctx, head, items, tail), sentence, 20, {"depth": depth, "quote_id": qid,
                                                                "question_chars": len(tail)}


def _fewshot(rng, ctx, i, n_shots: int = 6):
    tag = rng.choice(TAGS)
    words = rng.sample(WORDS, n_shots + 1)
    shots, query = words[:n_shots], words[n_shots]
    span = (0.05, 0.6)
    depths = [span[0] + (span[1] - span[0]) * k / (n_shots - 1) for k in range(n_shots)]
    head = "The following text contains examples of a word game. Learn the rule from the examples.\n\n"
    items = [(d, f"Input: {w}\nOutput: {w} {tag}") for d, w in zip(depths, shots)]
    tail = f"\n\nNow apply the same rule.\nInput: {query}\nOutput:"
    answer = f"{query} {tag}"
    return _build(rng, ctx, head, items, tail), answer, 6, {"depth": span[1], "n_shots": n_shots, "tag": tag,
                                                             "question_chars": len(tail)}


@functools.lru_cache(maxsize=1)
def longdoc_text() -> str:
    """All documentation topics, in sorted order, as one text."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics))


@functools.lru_cache(maxsize=8)
def _longdoc_starts(seed: int, ctx: int) -> tuple[int, ...]:
    """Paragraph starts, in a seeded order: sample i takes the i-th, so no two
    samples of one (seed, length) share a start."""
    text = longdoc_text()
    starts = [m.end() for m in re.finditer(r"\n\n(?=[A-Z])", text) if m.end() < len(text) - 8 * ctx]
    return tuple(random.Random(f"casakv-quality:longdoc-starts:{seed}:{ctx}").sample(starts, len(starts)))


def _longdoc(rng, ctx, i, seed=0):
    starts = _longdoc_starts(seed, ctx)
    start = starts[i % len(starts)]
    tok = tokenizer()
    ids = tok(longdoc_text()[start: start + 8 * ctx], add_special_tokens=False)["input_ids"]
    return tok.decode(ids[:ctx]), None, 16, {"offset": start}


_MAKERS = {"passkey": _passkey, "multikey": _multikey, "copy": _copy, "fewshot": _fewshot, "longdoc": _longdoc}


def make_samples(task: str, n: int, seed: int = 0, context_tokens: int | None = None) -> list[Sample]:
    """``n`` samples of ``task`` at about ``context_tokens`` prompt tokens
    (default ``DEFAULT_CONTEXT[task]``); deterministic in (task, n, seed, context)."""
    if task not in _MAKERS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    ctx = int(context_tokens or DEFAULT_CONTEXT[task])
    out = []
    for i in range(n):
        rng = _rng(task, seed, ctx, i)
        made = _longdoc(rng, ctx, i, seed) if task == "longdoc" else _MAKERS[task](rng, ctx, i)
        prompt, answer, max_tokens, meta = made
        question = meta.pop("question_chars", None)
        meta = {**meta, "context_tokens": ctx, "prompt_tokens": count_tokens(prompt), "seed": seed}
        out.append(Sample(task, f"{task}-{ctx}-s{seed}-{i:04d}", prompt, answer, max_tokens, meta,
                          None if question is None else len(prompt) - question))
    return out


def prompt_ids(sample: Sample, tok=None) -> tuple[list[int], int | None]:
    """The prompt's token ids as the server tokenizes a text prompt (special tokens included), and the index
    of the first token holding a character of the question (None without one): what
    ``casakv_question_at`` names."""
    tok = tok or tokenizer()
    enc = tok(sample.prompt, add_special_tokens=True, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if sample.question_start is None:
        return ids, None
    at = next((i for i, (_, end) in enumerate(enc["offset_mapping"]) if end > sample.question_start), len(ids))
    return ids, at
