"""The bench's one touch of batchgen's CPU matmul choice (``bench --cpu-matmul``).

Kept to this module so that the choice's home can move (today a switch in ``batchgen.model``)
by re-pointing these three functions and nothing else.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

from batchgen import model as model_module


def onednn_available() -> bool:
    """Whether this PyTorch build can run batchgen's fp32 CPU matmuls through oneDNN."""
    return model_module.onednn_linear_available()


def cpu_matmul_in_use() -> str:
    """``"onednn"`` or ``"blas"``: what batchgen's fp32 CPU matmuls go through right now."""
    return "onednn" if model_module.CPU_ONEDNN_LINEAR else "blas"


@contextmanager
def cpu_matmul(kind: Optional[str]) -> Iterator[None]:
    """batchgen's fp32 CPU matmuls through ``kind`` (``"onednn"`` or ``"blas"``) inside the block,
    and back to what they were after it; ``None`` leaves the choice as it is."""
    if kind is None:
        yield
        return
    before, model_module.CPU_ONEDNN_LINEAR = model_module.CPU_ONEDNN_LINEAR, kind == "onednn"
    try:
        yield
    finally:
        model_module.CPU_ONEDNN_LINEAR = before
