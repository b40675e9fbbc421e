"""Builds one step's batch tensors, runs the model and samples.

A step packs the last token of every decoding request first (the rest of their context is read
from the paged cache), then every uncached token of the requests being prefilled: those with
nothing cached first, then those that continue a cached prefix (``req.num_cached`` tokens
shared through the block manager's prefix index, or a classification child's forked prompt)
and the branches of classification rows (``engine/classify.py``). Logits are computed for each
request's last token only, or for its last ``num_logit_rows`` tokens (a classification row scores
its choices' tokens at its prompt's last token and at every branch token).
"""

from __future__ import annotations

import itertools
from typing import Optional

import torch

from batchgen.engine.adapters import LoraStack, step_lora
from batchgen.engine.attention import AttentionMetadata, PagedAttention
from batchgen.engine.flex import FlexBackend
from batchgen.engine.graphs import DecodeGraphs
from batchgen.engine.kv_cache import BlockManager, KVCache
from batchgen.engine.request import Request
from batchgen.engine.sampler import sample
from batchgen.model import Transformer


def prefill_pieces(prefill: list[Request]) -> list[tuple[int, int, int]]:
    """``(request index, first token, end)`` of each run of tokens a step prefills, in packing
    order: those starting at 0 first (one causal SDPA over their tokens), then those continuing a
    cached prefix; within each, by LoRA slot, so that each adapter's tokens are one run
    (``engine.adapters``). A request holding branches (a classification row) is two pieces: its
    prompt, packed as any prefill, and its branches, packed with the continuations (their prefix
    being the prompt, whose K/V the same layer writes before it attends)."""
    pieces = []
    for i, req in enumerate(prefill):
        trunk = req.sequence_len
        if req.num_cached < trunk:
            pieces.append((i, req.num_cached, trunk))
        if trunk < len(req):
            pieces.append((i, trunk, len(req)))
    return sorted(pieces, key=lambda p: (p[1] > 0, prefill[p[0]].lora_slot))


class ModelRunner:
    """Runs the engine's steps: ``model`` reads and writes ``cache`` through a :class:`PagedAttention`."""

    def __init__(self, model: Transformer, cache: KVCache, blocks: BlockManager, device: torch.device,
                 graphs: Optional[DecodeGraphs] = None, flex: Optional[FlexBackend] = None,
                 lora: Optional[LoraStack] = None) -> None:
        self.model = model
        self.lora = lora  # unmerged adapters, addressed by each request's lora_slot
        self.cache = cache
        self.blocks = blocks
        self.block_size = blocks.block_size
        self.device = device
        self.graphs = graphs  # small decode-only steps replay from these (see engine/graphs.py)
        # The last step's logits rows and each request's span of them (classification reads them:
        # ``classify.score_step``).
        self.step_logits: Optional[torch.Tensor] = None  # [rows, vocab]
        self.spans: list[tuple[int, int]] = []
        self.flex = flex  # attention on FlexAttention instead of PagedAttention (engine/flex.py)

    def _to(self, data: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
        # Built on the host, copied once: cheaper than many small device writes.
        return torch.tensor(data, dtype=dtype).to(self.device, non_blocking=True)

    def _slot(self, req: Request, position: int) -> int:
        """The flat cache slot of ``req``'s token at ``position``."""
        return req.block_table[position // self.block_size] * self.block_size + position % self.block_size

    def _decode_inputs(self, decode: list[Request]) -> tuple[list[int], list[int], list[int]]:
        """Each decoding request's last token, its position and the cache slot its K/V go to."""
        positions = [len(req) - 1 for req in decode]
        return ([req.token_ids[-1] for req in decode], positions,
                [self._slot(req, p) for req, p in zip(decode, positions)])

    def prepare(self, decode: list[Request], prefill: list[Request], moves: list[tuple[int, int]],
                pieces: Optional[list[tuple[int, int, int]]] = None
                ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[list[int]]]:
        """Token ids, positions, attention metadata and, per request, the token rows whose logits
        it needs (its last token's; a classification row's last ``num_logit_rows``: its prompt's
        last token and its branches).

        ``moves`` are the block copies (src, dst) of a compaction, made before the step runs;
        ``pieces`` is ``prefill_pieces(prefill)`` when the caller has it already.
        """
        ids, positions, slots = self._decode_inputs(decode)
        # Sequences that start at 0 first (one causal SDPA over their new tokens), then those
        # that continue a cached prefix (they also read it from the cache).
        cu, ctx_cu, ctx_starts, ctx_tables = [0], [0], [], []
        branch_starts: list[int] = []  # of the ctx tokens, when a request holds branches
        branched = any(req.branch_starts is not None for req in prefill)
        where: list[list[tuple[int, int, int]]] = [[] for _ in prefill]  # (start, end, row in ids) of each piece
        for i, start, end in pieces if pieces is not None else prefill_pieces(prefill):
            req = prefill[i]
            where[i].append((start, end, len(ids)))
            ids.extend(req.token_ids[start:end])
            slots.extend(self._slot(req, p) for p in range(start, end))
            n = req.num_prompt_tokens
            if req.branch_starts is not None and start >= n:
                # Each branch continues the prompt: its first token sits right after it.
                branches = req.branch_starts[start - n:end - n]
                positions.extend(n + p - b for p, b in zip(range(start, end), branches))
            else:
                branches = [start] * (end - start)  # one sequence: every token sees all before it
                positions.extend(range(start, end))
            if start == 0:
                cu.append(cu[-1] + end)
            else:
                ctx_cu.append(ctx_cu[-1] + end - start)
                ctx_starts.append(start)
                ctx_tables.append(req.block_table)
                if branched:
                    branch_starts.extend(branches)
        # Per request, in request order: the rows of the tokens whose logits it needs (its last
        # ``num_logit_rows``), wherever its pieces were packed.
        rows: list[list[int]] = [[i] for i in range(len(decode))]
        for req, pieces in zip(prefill, where):
            begin = len(req) - min(req.num_logit_rows, len(req) - req.num_cached)
            rows.append([at + p - start for start, end, at in sorted(pieces) for p in range(max(start, begin), end)])

        metadata = AttentionMetadata(is_prefill=bool(prefill), cu_seqlens=cu if prefill else [],
                                     slot_mapping=self._to(slots), num_decode=len(decode),
                                     block_moves=self._to(list(zip(*moves))) if moves else None)
        if ctx_starts:
            width = max(len(t) for t in ctx_tables)
            metadata.ctx_cu_seqlens, metadata.ctx_starts = ctx_cu, ctx_starts
            metadata.ctx_branch_starts = branch_starts if branched else None
            metadata.ctx_block_tables = self._to([t + [0] * (width - len(t)) for t in ctx_tables])
        if decode:
            width = max(len(req.block_table) for req in decode)
            # Padding points at the null block 0, masked out past each context length.
            tables = [req.block_table + [0] * (width - len(req.block_table)) for req in decode]
            owner = [-1] * (1 + max(max(req.block_table) for req in decode))
            shared: dict[int, None] = {}
            for row, req in enumerate(decode):
                for b in req.block_table:
                    if owner[b] >= 0:
                        shared[b] = None
                    owner[b] = row
            metadata.block_tables = self._to(tables)
            metadata.context_lens = self._to([len(req) for req in decode])
            metadata.block_owner = self._to([max(o, 0) for o in owner])
            if shared:  # a cached prefix in several rows: in-place decode reads it once for all
                metadata.decode_shared_blocks = self._to(list(shared))
        return self._to(ids), self._to(positions), metadata, rows

    @torch.inference_mode()
    def run(self, decode: list[Request], prefill: list[Request], moves: list[tuple[int, int]]
            ) -> tuple[list[int], list[float] | None]:
        """One forward step; returns the next token (and logprob) of each request, decode first."""
        # Steps with adapter rows run eagerly: the captured graphs hold the base model only (the
        # LoRA update's per-step shapes cannot be captured; see engine/graphs.py).
        adapted = self.lora is not None and any(req.lora_slot >= 0 for req in decode + prefill)
        if (self.graphs is not None and decode and not prefill and not moves and not adapted
                and self.graphs.fits(len(decode), max(len(req.block_table) for req in decode))):
            logits = self.graphs.run(*self._decode_inputs(decode), [req.block_table for req in decode])
            spans = [(i, i + 1) for i in range(len(decode))]
        else:
            pieces = prefill_pieces(prefill)
            ids, positions_t, metadata, rows = self.prepare(decode, prefill, moves, pieces)
            if self.flex is None:
                attn = PagedAttention(self.cache, metadata)
            else:  # flex reads every prefilled sequence in token order (``prepare``'s); no branches there
                packed = [prefill[i] for i, _, _ in pieces]
                attn = self.flex.step(self.cache, metadata, [r.block_table for r in packed], [len(r) for r in packed])
            lora = None
            if adapted:  # one slot per token row: decode rows first, then the prefilled pieces
                slots = [req.lora_slot for req in decode]
                for i, start, end in pieces:
                    slots.extend([prefill[i].lora_slot] * (end - start))
                lora = step_lora(self.lora, slots, self.device)
            hidden = self.model(ids, positions_t, attn, lora)  # [T, dim]
            flat = [r for rs in rows for r in rs]
            # In request order, which the packing may not be even when every token is wanted.
            if flat != list(range(hidden.shape[0])):
                hidden = hidden[self._to(flat)]  # [rows, dim]: only the tokens whose logits are needed
            logits = self.model.compute_logits(hidden)  # [rows, vocab] fp32
            ends = list(itertools.accumulate(len(rs) for rs in rows))
            spans = [(e - len(rs), e) for e, rs in zip(ends, rows)]
        reqs = decode + prefill
        for req in reqs:
            req.num_cached = len(req)
            self.blocks.commit(req)  # its full blocks now hold K/V: index them for sharing
        self.step_logits, self.spans = logits, spans
        if len(spans) != logits.shape[0]:
            logits = logits[self._to([end - 1 for _, end in spans])]  # [B, vocab]: each one's last token
        return sample(logits, reqs)
