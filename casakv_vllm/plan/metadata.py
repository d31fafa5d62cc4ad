"""``CasakvMetadata``: what the builder hands vLLM for one batch, and every layer reads."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from casakv_vllm.plan.batch import BatchPlan


@dataclass
class CasakvMetadata:
    """Tensors describing one varlen batch, plus its plan.

    Attributes:
        num_actual_tokens: tokens in the batch (rows of q beyond are padding).
        max_query_len, max_seq_len: host ints (launch sizes; no device sync).
        query_start_loc: ``[num_reqs + 1]`` int32, device.
        seq_lens: ``[num_reqs]`` int32, device; context + new tokens.
        block_table: ``[num_reqs, max_blocks]`` int32, device.
        slot_mapping: ``[num_actual_tokens]`` int64, device; -1 = padding.
        query_start_loc_cpu, seq_lens_cpu: host ints.
        plan: each row's policy and state, the recordings, the device plans.
    """

    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    plan: BatchPlan
