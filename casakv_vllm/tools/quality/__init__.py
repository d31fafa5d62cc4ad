"""Quality suite for ``casakv eval quality``: offline long-context tasks
(``tasks``), pure scoring functions (``scoring``), reports (``report``) and the
dense calibration driver (``calibrate``)."""

from casakv_vllm.tools.quality.tasks import TASKS, Sample, make_samples

__all__ = ["TASKS", "Sample", "make_samples"]
