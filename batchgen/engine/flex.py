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

Full and partial blocks. Blocks wholly visible to a block of queries (in decode, all of a
row's blocks but its last) are listed as FlexAttention's "full" blocks, read without the
``mask_mod``; only the rest go through it.

Shapes. The kernel is compiled with static shapes (:func:`compiled_flex`), one per shape, so
steps are padded to few: decode rows to a batch bucket (``attention.batch_buckets``; queries
``[bucket * Hkv, G, 1, D]``, block-mask indices ``[bucket * Hkv, 1, 1, width]``, ``width``
fixed per engine: a function of the bucket alone, as a CUDA graph needs); prefilled sequences
to a bucket and their new tokens to a multiple of ``Q_BLOCK``. Compiled kernels are shared by
all engines of a process with the same pool, heads and dtype. On the CPU one compile takes
8-50 s (inductor's disk cache makes a repeat ~1 s), which is why the CPU default stays
``"default"``.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from batchgen.engine.attention import AttentionMetadata, batch_buckets, update_cache
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
    # Static shapes: with dynamic ones inductor's CPU FlexAttention kernel fails to compile for
    # some size combinations (torch 2.13); steps are padded to batch buckets instead, so there
    # are few shapes. Each shape is one entry of dynamo's cache for this function: allow many.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    return torch.compile(flex_attention, dynamic=False, fullgraph=True)


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
        self.decode_start = torch.zeros(max_rows * self.kv_heads, dtype=torch.long, device=dev)
        self.prefill_start = torch.zeros(max_rows * self.kv_heads, dtype=torch.long, device=dev)
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

    def bucket(self, rows: int) -> int:
        """The batch bucket ``rows`` query rows are padded to (``attention.batch_buckets``)."""
        return next(b for b in batch_buckets(self.max_rows) if b >= rows)

    def record_positions(self, tables: torch.Tensor, nblocks: torch.Tensor) -> None:
        """``block_pos[tables[r, j]] = j`` for every block in use (``j < nblocks[r]``)."""
        j = torch.arange(tables.shape[1], device=tables.device)
        real = j[None, :] < nblocks[:, None]
        dump = torch.full_like(tables, self.num_pool_blocks)
        self.block_pos.index_put_((torch.where(real, tables, dump).flatten(),), j.expand_as(tables).flatten())

    def block_mask(self, tables: torch.Tensor, full: torch.Tensor, kv_num: torch.Tensor, q_len: int,
                   mask_mod: Callable) -> BlockMask:
        """The block mask of query rows ``tables`` [R, W] (W <= width). Entry ``r * Hkv + h``,
        i-th block of queries, reads ``tables[r, :kv_num[r, i]] * Hkv + h`` ([R, q_rows] counts):
        the first ``full[r, i]`` of them whole (every query of the block sees every key: no
        ``mask_mod``), the rest through ``mask_mod``."""
        R, W = tables.shape
        Hkv, dev = self.kv_heads, tables.device
        q_rows = kv_num.shape[1]
        heads = torch.arange(Hkv, device=dev, dtype=torch.int32)
        ids = tables.to(torch.int32)[:, None, :] * Hkv + heads[None, :, None]  # [R, Hkv, W]
        ids = ids[:, :, None, :].expand(R, Hkv, q_rows, W)
        # The partial blocks of query block i start at its full count: shift each row left by it.
        shift = (full[:, None, :, None] + torch.arange(W, device=dev)).clamp_(max=W - 1).expand(R, Hkv, q_rows, W)
        full_ids = torch.zeros(R * Hkv, 1, q_rows, self.width, dtype=torch.int32, device=dev)
        full_ids[..., :W] = ids.reshape(R * Hkv, 1, q_rows, W)
        part_ids = torch.zeros_like(full_ids)
        part_ids[..., :W] = torch.gather(ids, 3, shift).reshape(R * Hkv, 1, q_rows, W)

        def per_entry(n: torch.Tensor) -> torch.Tensor:
            return n.to(torch.int32).repeat_interleave(Hkv, dim=0).view(R * Hkv, 1, q_rows)

        return BlockMask.from_kv_blocks(per_entry(kv_num - full), part_ids, per_entry(full), full_ids,
                                        BLOCK_SIZE=(Q_BLOCK, self.block_size), mask_mod=mask_mod,
                                        seq_lengths=(q_len, self.keys), compute_q_blocks=False)

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, mask: BlockMask) -> torch.Tensor:
        """FlexAttention of queries ``q`` [R * Hkv, G, L, D] over one layer's whole pool."""
        D = q.shape[-1]
        k = k_cache.view(1, 1, self.keys, D)
        v = v_cache.view(1, 1, self.keys, D)
        # The pool's size is fixed per engine: static, it keeps FlexAttention's CPU kernel on the
        # code path that compiles (a symbolic key length hits an inductor codegen bug in torch 2.13).
        torch._dynamo.mark_static(k)
        torch._dynamo.mark_static(v)
        options = None
        if q.device.type == "cuda" and q.shape[2] > 1:
            # The prefill kernel's key tile must divide the block mask's KV block (the cache's
            # block_size, >= 16); its default tiles (64, 128) do not. Decoding clamps its own.
            options = {"BLOCK_N": self.block_size}
        return self.kernel(q, k, v, block_mask=mask, enable_gqa=q.shape[1] > 1, kernel_options=options)


class FlexPagedAttention:
    """One step's attention on FlexAttention, with :class:`~batchgen.engine.attention.PagedAttention`'s
    contract: ``attn(layer_id, q, k, v) -> out`` over the packed tokens, decode tokens first.

    Every layer makes the step's block moves and cache writes, then reads its keys from the cache
    (the new tokens' included). Prefill sequence ``s`` holds ``prefill_lens[s]`` tokens in all, of
    which the step's are the last (``cu_seqlens``, then ``ctx_cu_seqlens``: sequences are in
    token order): any before them are a cached prefix, read through ``prefill_tables[s]`` like a
    decode row's context.
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
            # Padded up to a batch bucket: the compiled kernels are per shape (see compiled_flex).
            R = backend.bucket(B)
            ctx = metadata.context_lens
            if R > B:  # padding rows: position 0 in the null block
                tables = torch.cat([tables, tables.new_zeros(R - B, tables.shape[1])])
                ctx = torch.cat([ctx, ctx.new_ones(R - B)])
            nblocks = (ctx + bs - 1) // bs
            backend.record_positions(tables, nblocks)
            backend.decode_start[:R * Hkv].copy_((ctx - 1).repeat_interleave(Hkv))
            self.decode_rows = R
            # Every block but the last is wholly inside the context.
            self.decode_mask = backend.block_mask(tables, nblocks[:, None] - 1, nblocks[:, None], 1, backend.decode_mask)
        # Every prefilled sequence in token order: those starting at 0 (``cu_seqlens``), then those
        # continuing a cached prefix (``ctx_cu_seqlens``, packed after them). Here both are one
        # kind: the new tokens are each sequence's last, read against its whole table.
        cu = list(metadata.cu_seqlens or [0]) if metadata.is_prefill else [0]
        cu += [cu[-1] + c for c in metadata.ctx_cu_seqlens[1:]]
        self.num_seqs = len(cu) - 1
        self.prefill_mask: Optional[BlockMask] = None
        if self.num_seqs:
            if prefill_tables is None or prefill_lens is None:
                raise ValueError("the flex backend needs each prefilled sequence's block table and length")
            if self.num_seqs > backend.max_rows:
                raise ValueError(f"{self.num_seqs} prefilled sequences, the flex backend was built for {backend.max_rows}")
            new = [e - s for s, e in zip(cu[:-1], cu[1:])]
            starts = [n - m for n, m in zip(prefill_lens, new)]  # the new tokens are each sequence's last
            # Padded to [bucket, a multiple of Q_BLOCK]: few shapes, each compiled once. Padding
            # sequences hold one query at position 0 over the null block.
            S, L = backend.bucket(self.num_seqs), -(-max(new) // Q_BLOCK) * Q_BLOCK
            self.rows, self.max_len = S, L
            pad = S - self.num_seqs
            prefill_tables, starts, new = list(prefill_tables) + [[0]] * pad, starts + [0] * pad, new + [1] * pad
            W = max(len(t) for t in prefill_tables)
            ptables = torch.tensor([t + [0] * (W - len(t)) for t in prefill_tables], device=dev)
            backend.record_positions(ptables, torch.tensor([len(t) for t in prefill_tables[:self.num_seqs]] + [0] * pad,
                                                           device=dev))
            backend.prefill_start[:S * Hkv].copy_(torch.tensor(starts, device=dev).repeat_interleave(Hkv))
            # Block-mask row i of sequence s: queries i*Q_BLOCK.. read its blocks up to the last one
            # holding a key the block's last real query sees (padding queries: the same).
            q_rows = -(-L // Q_BLOCK)
            kv_num = [[-(-(p0 + min((i + 1) * Q_BLOCK, m)) // bs) for i in range(q_rows)]
                      for p0, m in zip(starts, new)]
            # Blocks whose last key is at or before the block of queries' first: seen whole.
            full = [[min(n, (p0 + i * Q_BLOCK + 1) // bs) for i, n in enumerate(row)] for p0, row in zip(starts, kv_num)]
            self.prefill_mask = backend.block_mask(ptables, torch.tensor(full, device=dev), torch.tensor(kv_num, device=dev),
                                                   L, backend.prefill_mask)
            seq = torch.repeat_interleave(torch.arange(self.num_seqs, device=dev), torch.tensor(new[:self.num_seqs], device=dev),
                                          output_size=cu[-1])
            # Row of each prefill token in the [S * L] layout.
            self.pad_index = seq * L + torch.arange(cu[-1], device=dev) - torch.tensor(cu[:-1], device=dev)[seq]

    def __call__(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = update_cache(self.cache, layer_id, self.moves, self.write, k, v)
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
        Hkv, R = self.backend.kv_heads, self.decode_rows
        if R > B:
            q = torch.cat([q, q.new_zeros(R - B, Hq, D)])
        # A copy (B * Hq * D values): a view would carry its base's sizes into the compiled
        # kernel's guards, and sizes equal by chance on one step would compile again on the next.
        qs = q.reshape(R * Hkv, Hq // Hkv, 1, D).clone()
        o = self.backend.attend(qs, k_cache, v_cache, self.decode_mask)
        return o.reshape(R, Hq, D)[:B]

    def prefill(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """The prefilled sequences' new queries q [T, Hq, D] -> [T, Hq, D], padded to [S, L]."""
        T, Hq, D = q.shape
        S, L, Hkv = self.rows, self.max_len, self.backend.kv_heads
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
