"""Torch-level building blocks: custom ops (torch.ops.casakv.*), paged KV access, attention math."""
