"""Counts kept on the KV device, read by the metrics thread without stalling the layer loop.

A pattern choice or a re-profile happens inside a layer's forward, on the
device.  Reading it back there would be a host sync; instead each update adds
on the device and queues a non-blocking copy into a pinned host mirror, which
``WorkerStats`` reads when it publishes (at most one update behind).
"""

from __future__ import annotations

import threading

import torch

from casakv_vllm.observe.estimate import PROGRAMS

#: slots of the tally: heads per pattern program, then heads checked for re-profiling, then re-profiled heads
SLOTS = (*PROGRAMS, "checked", "reprofiled")


class PatternTally:
    """Per process: (request, layer, KV head) pattern assignments by program, heads whose pattern a decode
    check measured, and re-profiled heads."""

    def __init__(self) -> None:
        self._device: torch.Tensor | None = None
        self._host: torch.Tensor | None = None
        self._lock = threading.Lock()

    def _ensure(self, device: torch.device) -> torch.Tensor:
        if self._device is None or self._device.device != device:
            self._device = torch.zeros(len(SLOTS), dtype=torch.int64, device=device)
            pinned = device.type == "cuda"
            self._host = torch.zeros(len(SLOTS), dtype=torch.int64, pin_memory=pinned)
        return self._device

    def add_programs(self, program: torch.Tensor) -> None:
        """``program`` ``[Hkv]`` long: one assignment per head (indices into ``PROGRAMS``)."""
        counts = self._ensure(program.device)
        counts[: len(PROGRAMS)] += torch.bincount(program.flatten(), minlength=len(PROGRAMS))[: len(PROGRAMS)]
        self._mirror()

    def add_reprofiled(self, checked: torch.Tensor, count: torch.Tensor) -> None:
        """``checked``, ``count``: 0-d device tensors, heads whose recall was measured and heads re-profiled."""
        counts = self._ensure(count.device)
        counts[-2] += checked.to(torch.int64)
        counts[-1] += count.to(torch.int64)
        self._mirror()

    def _mirror(self) -> None:
        with self._lock:
            self._host.copy_(self._device, non_blocking=self._device.is_cuda)

    def read(self) -> tuple[dict[str, int], int, int]:
        """``({program: assignments}, heads checked, re-profiled heads)`` as last mirrored."""
        with self._lock:
            if self._host is None:
                return {}, 0, 0
            values = self._host.tolist()
        return {name: int(v) for name, v in zip(PROGRAMS, values) if v}, int(values[-2]), int(values[-1])


TALLY = PatternTally()
