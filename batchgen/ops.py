"""Kernel choices under the model: which matmul a CPU inference step runs.

fp32 inference on a CPU goes through oneDNN's inner product by default (see :func:`linear`);
:func:`cpu_matmul` switches to PyTorch's BLAS (MKL) for a block of code, for A/B measurements::

    with cpu_matmul("blas"):
        llm.generate(prompts)

Model-side: imports nothing from the engine or the pipeline.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Literal

import torch
import torch.nn.functional as F

CpuMatmul = Literal["onednn", "blas"]


def onednn_linear_available() -> bool:
    """Whether this PyTorch build has oneDNN and the inner-product op :func:`linear` calls."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class _Choice:
    """The CPU matmul in force, for the whole process (as the engine's steps may run in any thread)."""

    onednn: bool = onednn_linear_available()


_choice = _Choice()


@contextlib.contextmanager
def cpu_matmul(kind: CpuMatmul) -> Iterator[None]:
    """Run fp32 CPU inference matmuls through ``kind`` inside the block, then restore the choice.

    Raises:
        ValueError: ``kind`` is neither ``"onednn"`` nor ``"blas"``, or ``"onednn"`` where this
            PyTorch build has no oneDNN inner product.
    """
    if kind not in ("onednn", "blas"):
        raise ValueError(f"cpu_matmul kind must be 'onednn' or 'blas', got {kind!r}")
    if kind == "onednn" and not onednn_linear_available():
        raise ValueError("cpu_matmul('onednn'): this PyTorch build has no oneDNN inner product")
    before = _choice.onednn
    _choice.onednn = kind == "onednn"
    try:
        yield
    finally:
        _choice.onednn = before


def current_cpu_matmul() -> CpuMatmul:
    """The CPU matmul :func:`linear` uses for fp32 inference right now."""
    return "onednn" if _choice.onednn else "blas"


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` [T, out] for x [T, in] and weight [out, in].

    fp32 CPU inference goes through oneDNN's inner product rather than ``F.linear`` (MKL's
    sgemm), which runs well below the machine's peak at the few rows of a decode step. On a 2-core
    EPYC the bench model's matmuls took 75 ms instead of 99 at 64 rows, 26 instead of 46 at 16
    rows (bench/NOTES.md). Same weight tensors: no copy, no packing. Everything else (autograd,
    bf16, CUDA) takes ``F.linear``.
    """
    # Not under torch.compile: inductor picks its own CPU kernels (and lowers this op only for
    # weights it packed itself). Not with autograd: the oneDNN op has no backward.
    if (_choice.onednn and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2
            and weight.is_contiguous() and not torch.is_grad_enabled() and not torch.compiler.is_compiling()):
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    return F.linear(x, weight)


__all__ = ["CpuMatmul", "cpu_matmul", "current_cpu_matmul", "linear", "onednn_linear_available"]
