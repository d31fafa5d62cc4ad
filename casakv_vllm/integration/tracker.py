"""The request tracker: a logits processor that watches the persistent batch (logits pass unchanged).

vLLM tells logits processors (entry-point group ``vllm.logits_processors``)
about every addition, removal and move of the persistent batch, before the
forward pass, with the row indices the attention metadata uses.  The tracker
turns them into the worker's :class:`~casakv_vllm.requests.state.RequestTable`.
In the API server its ``validate_params`` checks each request's casakv
settings, so a bad one is an HTTP 400 with one line.
"""

from __future__ import annotations

import torch

from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from casakv_vllm.integration.context import worker_context
from casakv_vllm.observe.store import prompt_key
from casakv_vllm.requests.params import check_request, question_at, request_overrides
from casakv_vllm.requests.state import RequestTable


class RequestTracker(LogitsProcessor):
    """Keeps ``rows[i] -> RequestState`` for the worker (see ``requests.state``)."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        extra = sampling_params.extra_args
        if not extra or not any(str(k).startswith("casakv_") for k in extra):
            return
        from casakv_vllm.config import CasakvConfig
        from casakv_vllm.integration.startup import SERVER

        if SERVER.backend_is_casakv is False:
            raise ValueError("casakv_* request parameters need a server started with --attention-backend casakv")
        check_request(SERVER.config or CasakvConfig(), extra, SERVER.device_type)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.table = RequestTable()
        worker_context().requests = self.table

    def is_argmax_invariant(self) -> bool:
        return True

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        table = self.table
        for index in batch_update.removed:
            table.remove(index)
        for index, params, prompt_ids, _outputs in batch_update.added:
            extra = params.extra_args if params is not None else None
            plen = len(prompt_ids) if prompt_ids is not None else 0
            try:
                overrides = request_overrides(extra)
                question = question_at(extra, plen) if prompt_ids is not None else None
            except ValueError:  # validated in the API server; never fail the engine here
                overrides, question = (), None
            key = prompt_key(prompt_ids) if prompt_ids is not None else None
            context = prompt_key(list(prompt_ids)[:question]) if question is not None else None
            table.add(index, params, plen, overrides, key, question, context)
        for a, b, direction in batch_update.moved:
            if direction == MoveDirectionality.SWAP:
                table.swap(a, b)
            else:
                table.move(a, b)
