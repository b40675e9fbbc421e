"""Paged attention on FlexAttention: K/V read in place through the block tables, for decode and
for prefill of new tokens against a cached prefix; chosen with ``LLM(attention_backend="flex")``.

The default backend (``batchgen.engine.attention``) reads the pool in place only in eager steps;
a replayed decode step (CUDA graphs) gathers every row's blocks into a dense copy first, capped
at ``graphs.MAX_GATHER_BYTES`` per layer. Here ``torch.nn.attention.flex_attention`` reads the
pool itself, so a replayed step moves only the KV bytes it needs and no cap applies.

How the pool is presented to FlexAttention. A layer's pool is ``[1 + N, Hkv, block_size, D]``
(block-major, then head), which no view turns into one sequence per KV head. So the whole pool
is one single-head key sequence ``[1, 1, (1 + N) * Hkv * block_size, D]``: the ``block_size``
keys of block ``b``, KV head ``h`` are "KV block" ``b * Hkv + h`` of FlexAttention's block mask
(whose KV block size is the cache's block size). Queries are laid out as ``[rows * Hkv, G, L, D]``
(G = query heads per KV head): batch entry ``r * Hkv + h`` is row ``r``'s group of query heads
that share KV head ``h``, and its block-mask row lists exactly ``tables[r] * Hkv + h``. GQA is
thus FlexAttention's own (G query heads on one key head) and the block mask needs no head dim.

Masking within the listed blocks (a row's last block is partly filled; causality in prefill) is a
``mask_mod`` reading two small buffers: ``block_pos[b]``, the logical index of physical block
``b`` in the table holding it, and ``q_start[r * Hkv + h]``, the position of row ``r``'s first
query. A key is visible iff its position ``block_pos[b] * block_size + offset`` is at most the
query's. A block's logical index is the same in every table that holds it (a prefix-cached
block holds the same positions for every sequence sharing it), so one ``block_pos`` serves the
whole step. Each step writes these buffers in place, so the compiled kernel and a CUDA graph
that recorded it see new contents at fixed addresses.

Shapes. Decode: queries ``[bucket * Hkv, G, 1, D]``, block-mask indices ``[bucket * Hkv, 1, 1,
width]``: a function of the batch bucket alone (``width`` is fixed per engine). Prefill: the
new tokens padded to ``[S, L]`` as in ``attention.prefill_padded``. The kernel is compiled once
(``dynamic=True``), shared by all engines of the process; a new shape class (decode vs prefill,
MHA vs GQA, dtype) compiles again. On the CPU each compile takes ~10-50 s (2 busy cores), which
is why the CPU default stays ``"default"``.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from batchgen.engine.attention import AttentionMetadata, move_blocks, write_kv
from batchgen.engine.kv_cache import KVCache
from batchgen.model import Transformer

#: Queries per block-mask row in prefill (FlexAttention's default Q block on a GPU).
Q_BLOCK = 128

ATTENTION_BACKENDS = ("default", "flex")


@functools.lru_cache(maxsize=None)
def compiled_flex() -> Callable[..., torch.Tensor]:
    """``flex_attention`` through ``torch.compile`` (uncompiled it materialises every score of
    the whole pool). One compiled function for the process: dynamo keeps one kernel per shape
    class and reuses it across engines, layers and steps."""
    return torch.compile(flex_attention, dynamic=True, fullgraph=True)


class FlexBackend:
    """An engine's FlexAttention state: the persistent mask buffers and the block-mask width.

    ``max_rows``: the most query rows of one step (the engine's ``max_num_seqs``; decode rows
    padded to a graph bucket never exceed it).
    """

    def __init__(self, cache: KVCache, max_model_len: int, max_rows: int) -> None:
        pool = cache.k[0]
        self.num_pool_blocks, self.kv_heads, self.block_size = pool.shape[0], pool.shape[1], pool.shape[2]
        self.keys = self.num_pool_blocks * self.kv_heads * self.block_size  # the flat key sequence
        self.max_rows = max_rows
        dev = cache.device
        # The block mask lists each row's blocks; a row holds at most max_blocks. FlexAttention
        # on the CPU also requires the mask to span every key (width * block_size >= keys).
        self.max_blocks = -(-max_model_len // self.block_size)
        self.width = self.max_blocks if dev.type == "cuda" else max(self.max_blocks, self.num_pool_blocks * self.kv_heads)
        # The last entry takes the writes of padding table entries (block 0 keeps position 0).
        self.block_pos = torch.zeros(self.num_pool_blocks + 1, dtype=torch.long, device=dev)
        # One spare entry: a buffer whose size equals a batch dimension by chance would tie the two
        # in the compiled kernel's dynamic shapes (duck sizing), see attend().
        self.decode_start = torch.zeros(max_rows * self.kv_heads + 1, dtype=torch.long, device=dev)
        self.prefill_start = torch.zeros(max_rows * self.kv_heads + 1, dtype=torch.long, device=dev)
        self.decode_mask = self._mask_mod(self.decode_start)
        self.prefill_mask = self._mask_mod(self.prefill_start)
        self.kernel = compiled_flex()

    def _mask_mod(self, q_start: torch.Tensor) -> Callable:
        block_pos, span = self.block_pos, self.kv_heads * self.block_size
        block_size = self.block_size

        def visible(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
            # kv_idx = (block * Hkv + head) * block_size + offset in the flat pool
            pos = block_pos[kv_idx // span] * block_size + kv_idx % block_size
            return pos <= q_start[b] + q_idx

        return visible

    def step(self, cache: KVCache, metadata: AttentionMetadata,
             prefill_tables: Optional[list[list[int]]] = None,
             prefill_lens: Optional[list[int]] = None) -> "FlexPagedAttention":
        """The per-step backend (``attn(layer_id, q, k, v) -> out``) for ``metadata``."""
        return FlexPagedAttention(self, cache, metadata, prefill_tables, prefill_lens)

    def record_positions(self, tables: torch.Tensor, nblocks: torch.Tensor) -> None:
        """``block_pos[tables[r, j]] = j`` for every block in use (``j < nblocks[r]``)."""
        j = torch.arange(tables.shape[1], device=tables.device)
        real = j[None, :] < nblocks[:, None]
        dump = torch.full_like(tables, self.num_pool_blocks)
        self.block_pos.index_put_((torch.where(real, tables, dump).flatten(),), j.expand_as(tables).flatten())

    def block_mask(self, tables: torch.Tensor, kv_num: torch.Tensor, q_len: int, mask_mod: Callable) -> BlockMask:
        """The block mask of query rows ``tables`` [R, W] (W <= width): entry ``r * Hkv + h``
        lists ``tables[r] * Hkv + h``, of which the first ``kv_num[r, i]`` [R, q_rows] are read
        by its i-th block of queries."""
        R, W = tables.shape
        Hkv = self.kv_heads
        heads = torch.arange(Hkv, device=tables.device, dtype=torch.int32)
        ids = tables.to(torch.int32)[:, None, :] * Hkv + heads[None, :, None]  # [R, Hkv, W]
        indices = torch.zeros(R * Hkv, 1, kv_num.shape[1], self.width, dtype=torch.int32, device=tables.device)
        indices[..., :W] = ids.reshape(R * Hkv, 1, 1, W)
        num = kv_num.to(torch.int32).repeat_interleave(Hkv, dim=0).view(R * Hkv, 1, -1)
        return BlockMask.from_kv_blocks(num, indices, BLOCK_SIZE=(Q_BLOCK, self.block_size),
                                        mask_mod=mask_mod, seq_lengths=(q_len, self.keys), compute_q_blocks=False)

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, mask: BlockMask) -> torch.Tensor:
        """FlexAttention of queries ``q`` [R * Hkv, G, L, D] over one layer's whole pool."""
        D = q.shape[-1]
        k = k_cache.view(1, 1, self.keys, D)
        v = v_cache.view(1, 1, self.keys, D)
        # The pool's size is fixed per engine: static, it keeps FlexAttention's CPU kernel on the
        # code path that compiles (a symbolic key length hits an inductor codegen bug in torch 2.13).
        torch._dynamo.mark_static(k)
        torch._dynamo.mark_static(v)
        return self.kernel(q, k, v, block_mask=mask, enable_gqa=q.shape[1] > 1)


class FlexPagedAttention:
    """One step's attention on FlexAttention, with :class:`~batchgen.engine.attention.PagedAttention`'s
    contract: ``attn(layer_id, q, k, v) -> out`` over the packed tokens, decode tokens first.

    Every layer makes the step's block moves and cache writes, then reads its keys from the cache
    (the new tokens' included). Prefill sequence ``s`` holds ``prefill_lens[s]`` tokens in all, of
    which the step's are the last (``cu_seqlens``): any before them are a cached prefix, read
    through ``prefill_tables[s]`` like a decode row's context.
    """

    def __init__(self, backend: FlexBackend, cache: KVCache, metadata: AttentionMetadata,
                 prefill_tables: Optional[list[list[int]]] = None, prefill_lens: Optional[list[int]] = None) -> None:
        self.backend, self.cache, self.metadata = backend, cache, metadata
        bs, dev, Hkv = backend.block_size, cache.device, backend.kv_heads
        self.moves = metadata.block_moves
        self.write: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        if metadata.slot_mapping is not None:
            slots = metadata.slot_mapping
            self.write = (slots // bs, slots % bs)
        tables = metadata.block_tables
        self.num_decode = (metadata.num_decode if metadata.is_prefill
                           else tables.shape[0] if tables is not None else 0)
        self.decode_mask: Optional[BlockMask] = None
        if self.num_decode:
            B = tables.shape[0]
            if B > backend.max_rows:
                raise ValueError(f"{B} decode rows, the flex backend was built for {backend.max_rows}")
            ctx = metadata.context_lens
            nblocks = (ctx + bs - 1) // bs
            backend.record_positions(tables, nblocks)
            backend.decode_start[:B * Hkv].copy_((ctx - 1).repeat_interleave(Hkv))
            self.decode_mask = backend.block_mask(tables, nblocks[:, None], 1, backend.decode_mask)
        self.num_seqs = len(metadata.cu_seqlens) - 1 if metadata.is_prefill else 0
        self.prefill_mask: Optional[BlockMask] = None
        if self.num_seqs:
            if prefill_tables is None or prefill_lens is None:
                raise ValueError("the flex backend needs each prefilled sequence's block table and length")
            if self.num_seqs > backend.max_rows:
                raise ValueError(f"{self.num_seqs} prefilled sequences, the flex backend was built for {backend.max_rows}")
            cu = metadata.cu_seqlens
            new = [e - s for s, e in zip(cu[:-1], cu[1:])]
            starts = [n - m for n, m in zip(prefill_lens, new)]  # the new tokens are each sequence's last
            S, L = self.num_seqs, max(new)
            self.max_len = L
            W = max(len(t) for t in prefill_tables)
            ptables = torch.tensor([t + [0] * (W - len(t)) for t in prefill_tables], device=dev)
            backend.record_positions(ptables, torch.tensor([len(t) for t in prefill_tables], device=dev))
            backend.prefill_start[:S * Hkv].copy_(torch.tensor(starts, device=dev).repeat_interleave(Hkv))
            # Block-mask row i of sequence s: queries i*Q_BLOCK.. read its blocks up to the last one
            # holding a key the block's last real query sees (padding queries: the same).
            q_rows = -(-L // Q_BLOCK)
            kv_num = [[-(-(p0 + min((i + 1) * Q_BLOCK, m)) // bs) for i in range(q_rows)]
                      for p0, m in zip(starts, new)]
            self.prefill_mask = backend.block_mask(ptables, torch.tensor(kv_num, device=dev), L, backend.prefill_mask)
            seq = torch.repeat_interleave(torch.arange(S, device=dev), torch.tensor(new, device=dev), output_size=cu[-1])
            # Row of each prefill token in the [S * L] layout.
            self.pad_index = seq * L + torch.arange(cu[-1], device=dev) - torch.tensor(cu[:-1], device=dev)[seq]

    def __call__(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = self.cache.k[layer_id], self.cache.v[layer_id]
        if self.moves is not None:
            move_blocks(k_cache, v_cache, self.moves)
        if self.write is not None:
            write_kv(k_cache, v_cache, k, v, *self.write)
        n = self.num_decode
        outs = []
        if n:
            outs.append(self.decode(q[:n], k_cache, v_cache))
        if self.num_seqs:
            outs.append(self.prefill(q[n:], k_cache, v_cache))
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """One query per row, q [B, Hq, D] -> [B, Hq, D]; B * Hkv block-mask rows, viewed, not copied."""
        B, Hq, D = q.shape
        Hkv = self.backend.kv_heads
        # A copy (B * Hq * D values): a view would carry its base's sizes into the compiled
        # kernel's guards, and sizes equal by chance on one step would compile again on the next.
        qs = q.reshape(B * Hkv, Hq // Hkv, 1, D).clone()
        o = self.backend.attend(qs, k_cache, v_cache, self.decode_mask)
        return o.reshape(B, Hq, D)

    def prefill(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """The prefilled sequences' new queries q [T, Hq, D] -> [T, Hq, D], padded to [S, L]."""
        T, Hq, D = q.shape
        S, L, Hkv = self.num_seqs, self.max_len, self.backend.kv_heads
        G = Hq // Hkv
        padded = q.new_zeros(S * L, Hq, D).index_copy_(0, self.pad_index, q)
        qs = padded.view(S, L, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(S * Hkv, G, L, D)
        o = self.backend.attend(qs, k_cache, v_cache, self.prefill_mask)  # [S * Hkv, G, L, D]
        o = o.view(S, Hkv, G, L, D).permute(0, 3, 1, 2, 4).reshape(S * L, Hq, D)
        return o[self.pad_index]


def flex_decode_logits(model: Transformer, cache: KVCache, ids: torch.Tensor, positions: torch.Tensor,
                       slots: torch.Tensor, tables: torch.Tensor, context_lens: torch.Tensor, *,
                       backend: FlexBackend) -> torch.Tensor:
    """``graphs.decode_logits`` on FlexAttention: logits [B, vocab] (fp32) of a decode step that
    reads its blocks in place. Every shape is a function of ``tables``' shape, as a CUDA graph needs."""
    metadata = AttentionMetadata(is_prefill=False, slot_mapping=slots, block_tables=tables, context_lens=context_lens)
    return model.compute_logits(model(ids, positions, backend.step(cache, metadata)))


__all__ = ["ATTENTION_BACKENDS", "FlexBackend", "FlexPagedAttention", "compiled_flex", "flex_decode_logits"]
