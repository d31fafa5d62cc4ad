"""casakv-vllm: CASAK-V sparse attention and KV-cache compression for vLLM."""

__version__ = "0.1.0"

SUPPORTED_VLLM = ">=0.32,<0.34"
