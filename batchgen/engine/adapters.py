"""Unmerged LoRA adapters in the engine: a job's adapters resident in one stack, and each step's
hook that adds every row's low-rank update to the fused projections.

The model runs the base matmul once for all rows of a step and calls the hook (the model's
:class:`~batchgen.model.LoraHook`) after each of ``wqkv``, ``wo``, ``w13`` and ``w2``; the hook
adds ``scale * B @ A`` of the row's adapter to that row's output (:func:`batchgen.lora.lora_forward`,
``grouped`` form: per adapter with rows in the step, two small matmuls on its rows). Base rows
(slot -1) get nothing. The runner builds one hook per step from each request's ``lora_slot``.

A merged adapter (one for the whole job) needs none of this: ``load_model(adapters=[...])``
adds it into the weights at load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Union

import torch

from batchgen.lora import LoraAdapter, LoraStack, load_adapter, lora_forward, lora_rows
from batchgen.model import ModelArgs

#: The model's fused projections and the adapter projections stacked in each, in row order
#: (``Attention.fused_rows`` / ``FeedForward.fused_rows``).
FUSE: dict[str, tuple[str, ...]] = {"wqkv": ("wq", "wk", "wv"), "w13": ("w1", "w3")}

AdapterSource = Union[str, Path, LoraAdapter]


def load_adapters(adapters: Mapping[str, AdapterSource], args: ModelArgs) -> list[LoraAdapter]:
    """Each ``name -> directory or LoraAdapter`` as a full (unsliced) fp32 :class:`LoraAdapter`
    named ``name`` (raises :class:`batchgen.lora.AdapterError` naming the file when one does not fit)."""
    out = []
    for name, src in adapters.items():
        if not name:
            raise ValueError("an adapter name must be non-empty (empty means the base model)")
        a = src if isinstance(src, LoraAdapter) else load_adapter(src, args, name)
        if a.name != name:
            a = LoraAdapter(name, a.source, a.weights, a.world_size, a.rank, a.fingerprint)
        out.append(a)
    return out


def build_stack(adapters: Mapping[str, AdapterSource], args: ModelArgs, world_size: int, rank: int,
                dtype: torch.dtype, device: torch.device) -> LoraStack:
    """The resident stack of a replica (or of one tensor-parallel rank: each adapter cut the way
    that rank's base slice is cut), in the model's dtype, fused as the model fuses its matmuls."""
    full = load_adapters(adapters, args)
    return LoraStack([a.tp_slice(world_size, rank, args) for a in full], args, dtype=dtype, device=device, fuse=FUSE)


class StepLora:
    """One step's :class:`~batchgen.model.LoraHook`: ``index`` [T] is each token row's slot (-1 = base)."""

    def __init__(self, stack: LoraStack, index: torch.Tensor) -> None:
        self.stack = stack
        self.index = index
        self.rows = lora_rows(index, len(stack.names))  # groups found once per step, reused by every layer

    def __call__(self, layer_id: int, proj: str, x: torch.Tensor, out: torch.Tensor) -> None:
        lora_forward(x, proj, layer_id, self.rows, self.stack, out=out)


def step_lora(stack: Optional[LoraStack], slots: list[int], device: torch.device) -> Optional[StepLora]:
    """The hook for a step whose token rows use ``slots``; None when no row uses an adapter."""
    if stack is None or all(s < 0 for s in slots):
        return None
    return StepLora(stack, torch.tensor(slots, dtype=torch.long).to(device, non_blocking=True))


__all__ = ["FUSE", "AdapterSource", "StepLora", "build_stack", "load_adapters", "step_lora"]
