"""Per-request settings (from ``vllm_xargs``) and per-request state."""
