"""The step broadcast of a tensor-parallel replica: what rank 0 sends before every forward.

Rank 0 sends each step's model inputs (tokens, positions, every field of
:class:`~batchgen.engine.attention.AttentionMetadata` and the rows' LoRA slots) and the
followers rebuild them bit for bit. No pickling: a fixed ``int64[HEADER_LEN]`` header (op code,
item count, payload size, one descriptor per item), then one ``uint8`` payload holding every
tensor's bytes, each at an aligned offset. ``batchgen.engine.tp`` runs the group around it.
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any, Optional

import torch
import torch.distributed as dist

from batchgen.engine.adapters import StepLora
from batchgen.engine.attention import AttentionMetadata, PagedAttention

HEADER_LEN = 192
OP_STOP, OP_STEP, OP_NOOP = 0, 1, 2
_KIND_NONE, _KIND_TENSOR, _KIND_INT, _KIND_BOOL, _KIND_INTS = range(5)
_DESC = 8  # ints per item: kind, value/dtype, on_host, ndim, up to 4 dims
_MAX_DIMS = 4
_ALIGN = 16  # payload offsets stay aligned so byte slices can be viewed as any dtype
_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
           torch.float32, torch.float16, torch.bfloat16, torch.float64)
# The last item is the step's LoRA slot per token row (None when no row uses an unmerged adapter).
_ITEM_NAMES = ("tokens", "positions") + tuple(f.name for f in fields(AttentionMetadata)) + ("lora_index",)


class TPError(RuntimeError):
    """A tensor-parallel collective failed, timed out, or the ranks disagree: recreate the group."""


def _padded(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class StepChannel:
    """Rank 0 sends each step's model inputs; followers rebuild them bit for bit."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def send_op(self, op: int) -> None:
        header = torch.zeros(HEADER_LEN, dtype=torch.int64)
        header[0] = op
        dist.broadcast(header.to(self.device), src=0)

    def send_step(self, tokens: torch.Tensor, positions: torch.Tensor, attn: PagedAttention,
                  lora: Optional[StepLora] = None) -> None:
        if not isinstance(attn, PagedAttention):
            raise TypeError(f"tensor parallel: the model's attention backend is a {type(attn).__name__}, "
                            "expected PagedAttention")
        if lora is not None and not isinstance(lora, StepLora):
            raise TypeError(f"tensor parallel: the model's LoRA hook is a {type(lora).__name__}, expected StepLora")
        metadata = attn.metadata
        values = ((tokens, positions) + tuple(getattr(metadata, f.name) for f in fields(AttentionMetadata))
                  + (lora.index if lora is not None else None,))
        if 3 + _DESC * len(values) > HEADER_LEN:
            raise TypeError(f"tensor parallel: {len(values)} step items do not fit a {HEADER_LEN}-int header")
        header = [OP_STEP, len(values), 0]
        pieces: list[torch.Tensor] = []
        nbytes = 0
        for name, v in zip(_ITEM_NAMES, values):
            desc = [0] * _DESC
            t: Optional[torch.Tensor] = None
            if v is None:
                desc[0] = _KIND_NONE
            elif isinstance(v, bool):
                desc[:2] = [_KIND_BOOL, int(v)]
            elif isinstance(v, int):
                desc[:2] = [_KIND_INT, v]
            elif isinstance(v, torch.Tensor):
                if v.dim() > _MAX_DIMS or v.dtype not in _DTYPES:
                    raise TypeError(f"tensor parallel: step item {name!r} is a {v.dim()}-d {v.dtype} tensor; "
                                    f"the broadcast carries up to {_MAX_DIMS}-d tensors of {_DTYPES}")
                t = v
                desc[:4] = [_KIND_TENSOR, _DTYPES.index(v.dtype), int(v.device.type == "cpu"), v.dim()]
                desc[4:4 + v.dim()] = list(v.shape)
            elif isinstance(v, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
                t = torch.tensor(list(v), dtype=torch.int64)
                desc[:2] = [_KIND_INTS, len(v)]
            else:
                raise TypeError(f"tensor parallel: step item {name!r} is a {type(v).__name__}, which the "
                                "step broadcast cannot carry (None, bool, int, list of int or tensor)")
            if t is not None and t.numel():
                raw = t.to(self.device).contiguous().view(-1).view(torch.uint8)
                pieces.append(raw)
                pad = _padded(raw.numel()) - raw.numel()
                if pad:
                    pieces.append(torch.zeros(pad, dtype=torch.uint8, device=self.device))
                nbytes += raw.numel() + pad
            header.extend(desc)
        header[2] = nbytes
        header.extend([0] * (HEADER_LEN - len(header)))
        dist.broadcast(torch.tensor(header, dtype=torch.int64).to(self.device), src=0)
        if nbytes:
            dist.broadcast(torch.cat(pieces), src=0)

    def recv_step(self) -> Optional[tuple[torch.Tensor, torch.Tensor, AttentionMetadata, Optional[torch.Tensor]]]:
        """The next step's model inputs; None when rank 0 says stop. Keep-alives are skipped."""
        while True:
            header_t = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
            dist.broadcast(header_t, src=0)
            header = header_t.tolist()
            if header[0] == OP_STOP:
                return None
            if header[0] == OP_STEP:
                break
            if header[0] != OP_NOOP:
                raise TPError(f"unknown op code {header[0]} from rank 0 (different batchgen versions?)")
        n, nbytes = header[1], header[2]
        if n != len(_ITEM_NAMES):
            raise TPError(f"rank 0 sent {n} step items, this rank expects {len(_ITEM_NAMES)} "
                          "(different batchgen versions?)")
        payload = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        if nbytes:
            dist.broadcast(payload, src=0)
        values: list[Any] = []
        offset = 0
        for i in range(n):
            kind, a, on_host, ndim, *dims = header[3 + _DESC * i: 3 + _DESC * (i + 1)]
            if kind == _KIND_NONE:
                values.append(None)
            elif kind in (_KIND_INT, _KIND_BOOL):
                values.append(bool(a) if kind == _KIND_BOOL else a)
            elif kind == _KIND_INTS:
                values.append(payload[offset:offset + 8 * a].view(torch.int64).tolist() if a else [])
                offset += _padded(8 * a)
            else:
                dtype, shape = _DTYPES[a], dims[:ndim]
                size = math.prod(shape) * dtype.itemsize
                t = payload[offset:offset + size].view(dtype).view(shape)
                offset += _padded(size)
                values.append(t.cpu() if on_host and self.device.type != "cpu" else t)
        metadata = AttentionMetadata(**dict(zip(_ITEM_NAMES[2:-1], values[2:-1])))
        return values[0], values[1], metadata, values[-1]


__all__ = ["HEADER_LEN", "OP_NOOP", "OP_STEP", "OP_STOP", "StepChannel", "TPError"]
