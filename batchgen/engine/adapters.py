"""Unmerged LoRA adapters in the engine: a job's adapters resident in one stack, and each step's
hook that adds every row's low-rank update to the fused projections.

The model runs the base matmul once for all rows of a step and calls the hook (the model's
:class:`~batchgen.model.LoraHook`) after each of ``wqkv``, ``wo``, ``w13`` and ``w2``; the hook
adds ``scale * B @ A`` of the row's adapter to that row's output (:func:`lora_forward`). The
engine packs a step's rows sorted by adapter, so each adapter's rows are a few runs of
consecutive rows: per run, one small matmul with A and one with each part's block of B, added
into the output in place (the ``segments`` form). Base rows (slot -1) get nothing. The runner
builds one hook per step from each request's ``lora_slot``.

:class:`LoraStack` holds a replica's adapters (or one tensor-parallel rank's slices of them) in
slots, zero-padded to one rank and fused as the model fuses its matmuls.

A merged adapter (one for the whole job) needs none of this: ``load_model(adapters=[...])``
adds it into the weights at load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Mapping, Optional, Sequence, Union

import torch

from batchgen.lora import PROJECTIONS, LoraAdapter, _shapes, _tp_span, load_adapter
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


@dataclass
class StackedProj:
    """One (layer, projection) of every slot of a :class:`LoraStack`.

    ``A`` [N + 1, R, in] and ``Bt`` [N + 1, R, out] (B transposed, the scale folded in) are
    zero-padded to the stack's rank R, with a final all-zero slot for base rows (index -1).
    A fused entry (``wqkv``) holds its parts' A stacked along R and their B block-diagonally;
    ``parts`` gives, for each slot that adapts this projection, each adapted part's rows of A/Bt
    and columns of the output, ``(r0, r1, c0, c1)``, so that the ``segments`` form multiplies
    only the diagonal blocks.
    """

    A: torch.Tensor
    Bt: torch.Tensor
    parts: dict[int, list[tuple[int, int, int, int]]]

    @property
    def width(self) -> int:
        return self.A.shape[1]

    @property
    def groups(self) -> list[tuple[int, int]]:
        """``(slot, rows of A used)`` of each slot that adapts this projection."""
        return [(slot, blocks[-1][1]) for slot, blocks in self.parts.items()]


class LoraStack:
    """A job's adapters, resident together, addressed by slot (their order in ``adapters``).

    Built once per replica (after :meth:`LoraAdapter.tp_slice` on a TP rank); the engine gives
    each row its slot, or -1 for the base model, and calls :func:`lora_forward` per projection.
    ``fuse`` maps a new projection name to parts run as one (``{"wqkv": ("wq", "wk", "wv"),
    "w13": ("w1", "w3")}``, matching a model that fuses those matmuls): the update of the fused
    output [T, sum(out)] then costs one call instead of one per part.
    """

    def __init__(self, adapters: Sequence[LoraAdapter], args: ModelArgs, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", fuse: Optional[dict[str, Sequence[str]]] = None) -> None:
        self.names = [a.name for a in adapters]
        self.fingerprints = [a.fingerprint for a in adapters]
        self.rank = max((a.max_rank for a in adapters), default=0)
        self.nbytes = 0  # what a replica holds (padding included)
        self.projs: dict[tuple[int, str], StackedProj] = {}
        tp = {(a.world_size, a.rank) for a in adapters}
        if len(tp) > 1:
            raise ValueError(f"adapters {self.names} are cut for different tensor-parallel ranks {sorted(tp)}")
        ws, tp_rank = tp.pop() if tp else (1, 0)
        full = _shapes(args)
        n, R = len(adapters), self.rank
        fused_parts = {p for parts in (fuse or {}).values() for p in parts}
        unknown = sorted(fused_parts - set(PROJECTIONS))
        if unknown:
            raise ValueError(f"fuse names unknown projections {unknown}; known: {list(PROJECTIONS)}")
        layers = sorted({layer for a in adapters for layer, _ in a.weights})
        for layer in layers:
            plan = [(p, (p,)) for p in PROJECTIONS if p not in fused_parts] + list((fuse or {}).items())
            for name, parts in plan:
                if not any((layer, p) in a.weights for a in adapters for p in parts):
                    continue
                shapes = []
                for p in parts:  # this rank's (out, in) of each part
                    o, i = full[p]
                    if ws > 1:
                        dim, lo, hi = _tp_span(p, args, ws, tp_rank)
                        o, i = (hi - lo, i) if dim == 0 else (o, hi - lo)
                    shapes.append((o, i))
                if len({i for _, i in shapes}) != 1:
                    raise ValueError(f"fused projection {name!r}: parts {list(parts)} take different inputs")
                outs = [s[0] for s in shapes]
                in_f = shapes[0][1]
                A = torch.zeros(n + 1, R * len(parts), in_f, dtype=dtype, device=device)
                Bt = torch.zeros(n + 1, R * len(parts), sum(outs), dtype=dtype, device=device)
                blocks: dict[int, list[tuple[int, int, int, int]]] = {}
                for i, a in enumerate(adapters):
                    for j, p in enumerate(parts):
                        w = a.weights.get((layer, p))
                        if w is None:
                            continue
                        o0 = sum(outs[:j])
                        A[i, j * R:j * R + w.rank] = w.A.to(device=device, dtype=dtype)
                        Bt[i, j * R:j * R + w.rank, o0:o0 + outs[j]] = (w.B.float() * w.scale).T.to(device=device, dtype=dtype)
                        blocks.setdefault(i, []).append((j * R, j * R + w.rank, o0, o0 + outs[j]))
                self.projs[(layer, name)] = sp = StackedProj(A, Bt, blocks)
                self.nbytes += sp.A.numel() * sp.A.element_size() + sp.Bt.numel() * sp.Bt.element_size()

    def slot(self, name: str) -> int:
        """Slot of adapter ``name`` (KeyError naming the known ones if absent)."""
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"unknown adapter {name!r}; this job has {self.names}") from None


@dataclass
class LoraRows:
    """Per-step facts about the slot index [T], computed once and reused by every layer."""

    index: torch.Tensor  # [T] slot per row, -1 = base
    n_slots: int
    gather: torch.Tensor  # [T] slot per row with -1 mapped to the zero slot N
    host: Optional[list[int]] = None  # the same slots as a list, when the caller has them
    _groups: Optional[dict[int, torch.Tensor]] = None
    _masks: dict[int, torch.Tensor] = field(default_factory=dict)
    _runs: Optional[list[tuple[int, int, int]]] = None
    _few_runs: Optional[bool] = None

    @property
    def runs(self) -> list[tuple[int, int, int]]:
        """``(slot, start, end)`` of each run of consecutive rows on one adapter (base rows left
        out); from ``host`` without a device sync, else from the index (one sync, on first use)."""
        if self._runs is None:
            slots = self.host if self.host is not None else self.index.tolist()
            runs: list[tuple[int, int, int]] = []
            start = 0
            for i in range(1, len(slots) + 1):
                if i == len(slots) or slots[i] != slots[start]:
                    if slots[start] >= 0:
                        runs.append((slots[start], start, i))
                    start = i
            self._runs = runs
        return self._runs

    @property
    def few_runs(self) -> bool:
        """Whether the rows form at most 4 runs per adapter (``auto`` then takes ``segments``)."""
        if self._few_runs is None:
            runs = self.runs
            self._few_runs = len(runs) <= 4 * len({s for s, _, _ in runs})
        return self._few_runs

    @property
    def groups(self) -> dict[int, torch.Tensor]:
        """slot -> its row indices, for slots with rows (one host sync, on first use)."""
        if self._groups is None:
            slots = torch.unique(self.index).tolist()
            self._groups = {s: (self.index == s).nonzero().squeeze(1) for s in slots if s >= 0}
        return self._groups

    def mask(self, width: int, dtype: torch.dtype) -> torch.Tensor:
        """[T, N * width]: 1 on the ``width`` columns of each row's slot, 0 elsewhere (and on base rows)."""
        m = self._masks.get(width)
        if m is None or m.dtype != dtype:
            slots = torch.arange(self.n_slots, device=self.index.device)
            m = (self.index[:, None] == slots[None, :]).to(dtype).repeat_interleave(width, dim=1)
            self._masks[width] = m
        return m


def lora_rows(index: torch.Tensor, n_slots: int, host: Optional[list[int]] = None) -> LoraRows:
    """The per-step view of the rows' slots (``index`` [T], -1 = base; ``host``: the same as a
    list, if at hand) that every layer reuses."""
    gather = torch.where(index < 0, torch.full_like(index, n_slots), index)
    return LoraRows(index, n_slots, gather, host)


Method = Literal["auto", "segments", "grouped", "gathered", "masked"]


def lora_forward(x: torch.Tensor, proj: str, layer: int, rows: LoraRows | torch.Tensor, stack: LoraStack,
                 method: Method = "auto", out: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Each row's low-rank update [T, out] of projection ``proj`` in ``layer`` for inputs x [T, in].

    Add it to the base matmul's output (for row-parallel ``wo``/``w2`` on a TP rank: before the
    all-reduce). ``rows`` is the per-row slot (-1 = base) or its :func:`lora_rows` view. Returns
    None when no slot adapts this projection. With ``out`` (the base matmul's output [T, out]) the
    update is added into it in place and ``out`` is returned: no [T, out] zeros, no second pass.
    Forms, all equal to the naive per-row product (tests/test_lora.py):

    * ``segments``: per run of consecutive rows on one adapter (the engine sorts a step's rows
      by adapter, so there are few), the run's rows times A, then each adapted part's block of B
      added into its columns of the output in place: the fewest flops and no copies;
    * ``grouped``: per adapter with rows, its rows selected, two small matmuls, added back (one
      host sync per step to find the groups, then 4 ops per adapter; for rows in any order);
    * ``masked``: every row times every adapter's A in one matmul, the other slots' columns
      zeroed, one matmul with every B (N times the flops of grouped, but 3 ops and no host sync:
      shapes depend on T alone, as a CUDA graph needs);
    * ``gathered``: every row's A and B gathered (padded to the stack's rank), two batched
      matmuls (moves T copies of the factors: slow, kept as a measured alternative);
    * ``auto``: masked while a CUDA graph is being captured (the others' per-step shapes
      cannot be captured); else segments when the rows form at most 4 runs per adapter, grouped
      when they are scattered. ``python -m batchgen.bench.lora_layer`` has the CPU timings; GPU
      timings are yet to be taken.
    """
    sp = stack.projs.get((layer, proj))
    if sp is None:
        return None
    if isinstance(rows, torch.Tensor):
        rows = lora_rows(rows, len(stack.names))
    if method == "auto":
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            method = "masked"
        else:
            method = "segments" if rows.few_runs else "grouped"
    xf = x.to(sp.A.dtype)
    n, width, in_f = len(stack.names), sp.width, sp.A.shape[2]
    if method == "segments":
        target = out if out is not None else x.new_zeros(x.shape[0], sp.Bt.shape[2])
        for slot, a, b in rows.runs:
            blocks = sp.parts.get(slot)
            if not blocks:
                continue
            xa = xf[a:b] @ sp.A[slot, :blocks[-1][1]].T  # [rows, rank of every part]
            for r0, r1, c0, c1 in blocks:
                if target.dtype == xa.dtype:
                    target[a:b, c0:c1].addmm_(xa[:, r0:r1], sp.Bt[slot, r0:r1, c0:c1])
                else:
                    target[a:b, c0:c1] += (xa[:, r0:r1] @ sp.Bt[slot, r0:r1, c0:c1]).to(target.dtype)
        return target
    if method == "masked":
        xa = xf @ sp.A[:n].reshape(n * width, in_f).T  # [T, N * width]
        xa.mul_(rows.mask(width, xa.dtype))
        delta = xa @ sp.Bt[:n].reshape(n * width, -1)
    elif method == "gathered":
        xa = torch.bmm(sp.A[rows.gather], xf.unsqueeze(2))  # [T, width, 1]
        delta = torch.bmm(xa.transpose(1, 2), sp.Bt[rows.gather]).squeeze(1)  # [T, out]
    elif method == "grouped":
        target = out if out is not None else x.new_zeros(x.shape[0], sp.Bt.shape[2])
        groups = rows.groups
        for slot, used in sp.groups:
            idx = groups.get(slot)
            if idx is not None:
                xs = xf.index_select(0, idx)
                target.index_add_(0, idx, ((xs @ sp.A[slot, :used].T) @ sp.Bt[slot, :used]).to(x.dtype))
        return target
    else:
        raise ValueError(f"unknown LoRA method {method!r}; use auto, segments, grouped, masked or gathered")
    return out.add_(delta) if out is not None else delta.to(x.dtype)


def build_stack(adapters: Mapping[str, AdapterSource], args: ModelArgs, world_size: int, rank: int,
                dtype: torch.dtype, device: torch.device) -> LoraStack:
    """The resident stack of a replica (or of one tensor-parallel rank: each adapter cut the way
    that rank's base slice is cut), in the model's dtype, fused as the model fuses its matmuls."""
    full = load_adapters(adapters, args)
    return LoraStack([a.tp_slice(world_size, rank, args) for a in full], args, dtype=dtype, device=device, fuse=FUSE)


class StepLora:
    """One step's :class:`~batchgen.model.LoraHook`: ``index`` [T] is each token row's slot (-1 = base)."""

    def __init__(self, stack: LoraStack, index: torch.Tensor, host: Optional[list[int]] = None) -> None:
        self.stack = stack
        self.index = index
        self.rows = lora_rows(index, len(stack.names), host)  # runs found once per step, reused by every layer

    def __call__(self, layer_id: int, proj: str, x: torch.Tensor, out: torch.Tensor) -> None:
        lora_forward(x, proj, layer_id, self.rows, self.stack, out=out)


def step_lora(stack: Optional[LoraStack], slots: list[int], device: torch.device) -> Optional[StepLora]:
    """The hook for a step whose token rows use ``slots``; None when no row uses an adapter."""
    if stack is None or all(s < 0 for s in slots):
        return None
    return StepLora(stack, torch.tensor(slots, dtype=torch.long).to(device, non_blocking=True), slots)


__all__ = ["FUSE", "AdapterSource", "LoraRows", "LoraStack", "StackedProj", "StepLora", "build_stack",
           "load_adapters", "lora_forward", "lora_rows", "step_lora"]
