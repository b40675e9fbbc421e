"""Builds one step's batch tensors, runs the model and samples.

Prefill packs every scheduled request's uncached tokens into one vector; decode takes the last
token of each running request and reads the rest of its context from the paged cache.
"""

from __future__ import annotations

import torch

from batchgen.engine.kv_cache import BlockManager
from batchgen.engine.request import Request
from batchgen.engine.sampler import sample
from batchgen.model import AttentionMetadata, Transformer


class ModelRunner:
    def __init__(self, model: Transformer, blocks: BlockManager, device: torch.device) -> None:
        self.model = model
        self.blocks = blocks
        self.block_size = blocks.block_size
        self.device = device

    def _slot(self, req: Request, pos: int) -> int:
        return req.block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    def _to(self, data: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
        # Built on the host, copied once: cheaper than many small device writes.
        return torch.tensor(data, dtype=dtype).to(self.device, non_blocking=True)

    def prepare_prefill(self, reqs: list[Request]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu = [0]
        for req in reqs:
            # Without prefix caching a prefill always starts at position 0 (also after preemption).
            n = len(req)
            ids.extend(req.token_ids)
            positions.extend(range(n))
            slots.extend(self._slot(req, p) for p in range(n))
            cu.append(cu[-1] + n)
        meta = AttentionMetadata(is_prefill=True, cu_seqlens=cu, slot_mapping=self._to(slots))
        last = [c - 1 for c in cu[1:]]
        return self._to(ids), self._to(positions), meta, last

    def prepare_decode(self, reqs: list[Request]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        ids = [req.token_ids[-1] for req in reqs]
        positions = [len(req) - 1 for req in reqs]
        slots = [self._slot(req, p) for req, p in zip(reqs, positions)]
        width = max(len(req.block_table) for req in reqs)
        # Pad tables with block 0: its stale contents are masked out below.
        tables = [req.block_table + [0] * (width - len(req.block_table)) for req in reqs]
        context_lens = self._to([len(req) for req in reqs])
        span = torch.arange(width * self.block_size, device=self.device)
        mask = (span[None, :] < context_lens[:, None])[:, None, None, :]  # [B, 1, 1, width*block_size]
        meta = AttentionMetadata(
            is_prefill=False, slot_mapping=self._to(slots), block_tables=self._to(tables),
            context_lens=context_lens, decode_mask=mask,
        )
        return self._to(ids), self._to(positions), meta, list(range(len(reqs)))

    @torch.inference_mode()
    def run(self, reqs: list[Request], is_prefill: bool) -> tuple[list[int], list[float] | None]:
        """One forward step over ``reqs``; returns each request's next token (and logprob)."""
        prepare = self.prepare_prefill if is_prefill else self.prepare_decode
        ids, positions, meta, last = prepare(reqs)
        hidden = self.model(ids, positions, meta)  # [T, dim]
        if len(last) != hidden.shape[0]:
            hidden = hidden[self._to(last)]  # [B, dim]: only the last token of each sequence
        logits = self.model.compute_logits(hidden)  # [B, vocab] fp32
        for req in reqs:
            req.num_cached = len(req)
        return sample(logits, reqs)
