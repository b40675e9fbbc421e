"""Attention over the paged KV cache: the step plan, cache writes, block moves and the kernels.

The model computes projections and RoPE and calls one attention backend per layer (the
``AttentionBackend`` protocol in ``batchgen.model``); :class:`PagedAttention` is the engine's.
The model runner builds one per step from an :class:`AttentionMetadata` and the :class:`KVCache`;
it derives what every layer shares (cache addresses, masks, scratch space) once, then each
layer's call moves blocks, writes the new K/V into the cache and runs:

- decode rows: :func:`decode_in_place` (the CPU path: reads the pool in place up to its highest
  block in use) or :func:`decode_gathered` (gathers each row's blocks for SDPA; every shape a
  function of the tables' shape alone, which CUDA graphs need);
- prefill rows: :func:`prefill_padded` (one causal SDPA over the sequences padded to a batch);
  sequences that continue a cached prefix (prefix caching) go to :func:`prefill_with_context`,
  which reads their whole context back through their block tables once the new K/V are written.

A paged GPU kernel would be one more decode function chosen here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from batchgen.engine.kv_cache import KVCache


@dataclass
class AttentionMetadata:
    """Where each sequence of a packed step lives, built by the engine's model runner.

    A step packs ``num_decode`` decode tokens first, then (when ``is_prefill``) the new tokens of
    the sequences being prefilled. ``is_prefill=False`` means every token is a decode token.

    Prefill: ``cu_seqlens`` bounds each prefilled sequence within the prefill part (it starts
    at 0); every such sequence starts at position 0, so its keys are exactly its new tokens.
    Decode: one new token per sequence; keys are read back from the paged cache through
    ``block_tables`` (padded with the null block 0) and masked past ``context_lens``.
    ``block_owner[j]`` is the ``block_tables`` row holding block ``j``, for every block id below
    the largest one in the tables (0 where no decode row holds it): decode attention then reads
    the cache in place. Without ``block_owner`` it gathers each row's blocks instead, which
    keeps every shape a function of the tables' shape alone (what a CUDA graph needs), and
    allows a block in several rows (a shared cached prefix). In place, the blocks that several
    rows hold are listed in ``decode_shared_blocks``: every row's query meets them separately.

    Prefill continuing a cached prefix: after the ``cu_seqlens`` sequences come the new tokens of
    sequences whose first ``ctx_starts[i]`` tokens are in the cache (or are written by this very
    step before it attends: a classification row's prompt, whose branches follow); ``ctx_cu_seqlens``
    bounds them within that last part (it starts at 0) and ``ctx_block_tables`` [S, W] holds
    their block tables (padded with 0). ``ctx_branch_starts``, when given, holds for each of
    those new tokens the index in its sequence where its branch starts: the token sees the
    cached prefix and its own branch up to itself, not the other branches (a classification
    row's choices side by side, ``engine/classify.py``); a plain sequence's tokens give its start.
    """

    is_prefill: bool
    cu_seqlens: list[int] = field(default_factory=list)  # prefill: len S+1, python ints
    slot_mapping: Optional[torch.Tensor] = None  # [T] flat cache slot (block * block_size + offset)
    block_tables: Optional[torch.Tensor] = None  # decode: [B, max_blocks] block ids
    context_lens: Optional[torch.Tensor] = None  # decode: [B] tokens in cache incl. the new one
    block_owner: Optional[torch.Tensor] = None  # decode: [max block id + 1] row of each block
    num_decode: int = 0  # with is_prefill: how many leading tokens are decode tokens
    block_moves: Optional[torch.Tensor] = None  # [2, M] cache blocks to copy (src, dst) before the step
    ctx_cu_seqlens: list[int] = field(default_factory=list)  # prefill after a cached prefix: len S+1
    ctx_starts: list[int] = field(default_factory=list)  # [S] cached tokens before each one's new ones
    ctx_block_tables: Optional[torch.Tensor] = None  # [S, W] their block tables
    decode_shared_blocks: Optional[torch.Tensor] = None  # [N] blocks in several decode rows (with block_owner)
    ctx_branch_starts: Optional[list[int]] = None  # [ctx tokens] where each one's branch starts (see above)


class PagedAttention:
    """The engine's attention backend for one step: ``attn(layer_id, q, k, v) -> out``.

    q [T, Hq, D] and k, v [T, Hkv, D] are the step's packed tokens (RoPE applied to q and k),
    decode tokens first; out is [T, Hq, D]. Index tensors and scratch space are built once here
    and shared by every layer: masks and cache addresses are the same in all of them.
    """

    def __init__(self, cache: KVCache, metadata: AttentionMetadata) -> None:
        self.cache, self.metadata = cache, metadata
        block_size, dev = cache.block_size, cache.device
        self.moves = metadata.block_moves
        self.write: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        if metadata.slot_mapping is not None:
            slots = metadata.slot_mapping
            self.write = (slots // block_size, slots % block_size)  # (block, offset) of each token
        tables = metadata.block_tables
        self.num_decode = (metadata.num_decode if metadata.is_prefill
                           else tables.shape[0] if tables is not None else 0)
        # Decode: (B, W) = tables' shape; the masks in the layout each kernel wants.
        self.tables, self.owner = tables, metadata.block_owner
        self.mask: Optional[torch.Tensor] = None  # gathered: SDPA's boolean mask [B, 1, 1, W * block_size]
        self.bias: Optional[torch.Tensor] = None  # in place: additive mask [B, 1, 1, W, block_size]
        self._scores: Optional[torch.Tensor] = None
        self._probs: Optional[torch.Tensor] = None
        if self.num_decode:
            B, W = tables.shape
            span = torch.arange(W * block_size, device=dev)
            outside = span >= metadata.context_lens[:, None]  # [B, W * block_size]
            if self.owner is None:
                self.mask = (~outside).view(B, 1, 1, W * block_size)
            else:
                self.bias = torch.zeros(B, W * block_size, device=dev).masked_fill_(outside, float("-inf"))
                self.bias = self.bias.view(B, 1, 1, W, block_size)
        # In place with shared blocks: each table entry's index among them, and where there are.
        self.shared = metadata.decode_shared_blocks if self.owner is not None else None
        if self.shared is not None:
            index = torch.full((self.owner.shape[0],), -1, dtype=torch.long, device=dev)
            index[self.shared] = torch.arange(self.shared.shape[0], device=dev)
            pos = index[tables]  # [B, W]
            self.shared_mask = (pos >= 0).view(B, 1, 1, W, 1)
            self.shared_pos = pos.clamp(min=0)
            self.rows = torch.arange(B, device=dev)[:, None]
        # Prefill: the [S, L] batch the prefilled sequences are padded to.
        self.num_seqs = len(metadata.cu_seqlens) - 1 if metadata.is_prefill else 0
        self.padded = False
        self._pad_buf: Optional[torch.Tensor] = None
        if self.num_seqs:
            cu = metadata.cu_seqlens
            lens = [e - s for s, e in zip(cu[:-1], cu[1:])]
            self.max_len = max(lens)
            # Equal lengths (one sequence, or a batch of equal ones): the packed tokens already
            # form an [S, L] batch and need no padding.
            self.padded = any(n != self.max_len for n in lens)
            if self.padded:
                n = cu[-1]
                seq = torch.repeat_interleave(torch.arange(self.num_seqs, device=dev), torch.tensor(lens, device=dev),
                                              output_size=n)  # output_size: no device sync
                starts = torch.tensor(cu[:-1], device=dev)
                # Row of each prefill token in the [S * L] layout (every sequence starts at position 0).
                self.pad_index = seq * self.max_len + torch.arange(n, device=dev) - starts[seq]

        # Prefill after a cached prefix: queries padded to [S, Lq], keys read from the cache.
        self.num_ctx_seqs = len(metadata.ctx_starts)
        if self.num_ctx_seqs:
            cu, starts = metadata.ctx_cu_seqlens, metadata.ctx_starts
            lens = [e - s for s, e in zip(cu[:-1], cu[1:])]
            S, Lq, n = self.num_ctx_seqs, max(lens), cu[-1]
            self.ctx_len = Lq
            seq = torch.repeat_interleave(torch.arange(S, device=dev), torch.tensor(lens, device=dev), output_size=n)
            self.ctx_pad_index = seq * Lq + torch.arange(n, device=dev) - torch.tensor(cu[:-1], device=dev)[seq]
            W = metadata.ctx_block_tables.shape[1]
            # Query i of sequence s sits at position starts[s] + i and sees keys up to there.
            # Padding queries see key 0 at least, so their (unused) rows stay finite.
            limit = torch.tensor(starts, device=dev)[:, None] + torch.arange(Lq, device=dev)  # [S, Lq]
            keys = torch.arange(W * block_size, device=dev)
            mask = keys <= limit[..., None]  # [S, Lq, W * block_size]
            if metadata.ctx_branch_starts is not None:
                # A branch token also skips the keys of the branches before its own.
                lo = torch.tensor(starts, device=dev).repeat_interleave(Lq)  # padding queries: no branch
                lo[self.ctx_pad_index] = torch.tensor(metadata.ctx_branch_starts, device=dev)
                start = torch.tensor(starts, device=dev)[:, None, None]
                mask &= (keys < start) | (keys >= lo.view(S, Lq, 1))
            self.ctx_mask = mask.unsqueeze(1)

    def __call__(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = update_cache(self.cache, layer_id, self.moves, self.write, k, v)
        n = self.num_decode
        outs = []
        if n:
            if self.owner is not None:
                outs.append(decode_in_place(q[:n], k_cache, v_cache, self))
            else:
                outs.append(decode_gathered(q[:n], k_cache, v_cache, self.tables, self.mask))
        if self.num_seqs:
            m = n + self.metadata.cu_seqlens[-1]
            outs.append(prefill_padded(q[n:m], k[n:m], v[n:m], self))
            n = m
        if self.num_ctx_seqs:
            outs.append(prefill_with_context(q[n:], k_cache, v_cache, self))
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def scratch(self, q: torch.Tensor, k_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Buffers of :func:`decode_in_place`, reused by every layer: the scores [B, Hkv, G, W, block_size]
        (fp32, as the mask) and the per-block probabilities [hi, Hkv, G, block_size] (cache dtype)."""
        if self._scores is None:
            B, W = self.tables.shape
            Hkv, block_size = k_cache.shape[1], k_cache.shape[2]
            G = q.shape[1] // Hkv
            self._scores = torch.empty(B, Hkv, G, W, block_size, device=q.device)
            # Blocks no row holds stay 0, so their (unused) outputs are finite.
            self._probs = torch.zeros(self.owner.shape[0], Hkv, G, block_size, device=q.device, dtype=k_cache.dtype)
        return self._scores, self._probs

    def pad_buffer(self, width: int, dtype: torch.dtype) -> torch.Tensor:
        """Zeroed [S * L, width], reused by every layer; rows past a sequence's end stay zero
        (finite keys, masked by causality anyway)."""
        if self._pad_buf is None:
            self._pad_buf = torch.zeros(self.num_seqs * self.max_len, width, dtype=dtype, device=self.pad_index.device)
        return self._pad_buf


def update_cache(cache: KVCache, layer_id: int, moves: Optional[torch.Tensor],
                 write: Optional[tuple[torch.Tensor, torch.Tensor]], k: torch.Tensor,
                 v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's step on its pools before attention, for every backend: the block moves of a
    compaction first (``moves`` [2, M]), then the new tokens' K/V at ``write`` (block, offset).
    Returns the layer's (K, V) pools."""
    k_cache, v_cache = cache.k[layer_id], cache.v[layer_id]
    if moves is not None:  # the block manager renumbered blocks (compaction)
        move_blocks(k_cache, v_cache, moves)
    if write is not None:
        write_kv(k_cache, v_cache, k, v, *write)
    return k_cache, v_cache


def move_blocks(k_cache: torch.Tensor, v_cache: torch.Tensor, moves: torch.Tensor) -> None:
    """Copy cache blocks ``moves[0]`` to ``moves[1]`` ([2, M]) in one layer's K and V pools."""
    src, dst = moves
    k_cache[dst] = k_cache[src]
    v_cache[dst] = v_cache[src]


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             block: torch.Tensor, offset: torch.Tensor) -> None:
    """Store each token's k, v [T, Hkv, D] at (``block``, ``offset``) [T] of the pools
    [num_blocks, Hkv, block_size, D]."""
    k_cache[block, :, offset] = k
    v_cache[block, :, offset] = v


def prefill_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: PagedAttention) -> torch.Tensor:
    """Causal attention within each prefilled sequence: one SDPA over an [S, L] batch.

    q [T, Hq, D], k, v [T, Hkv, D] are the prefill tokens, sequence after sequence; returns [T, Hq, D].
    """
    S, L, T = plan.num_seqs, plan.max_len, q.shape[0]
    Hq, Hkv, D = q.shape[1], k.shape[1], q.shape[2]
    if plan.padded:
        # Right-padded, so causality alone keeps real queries off the padding keys. Row copies
        # into column ranges of one buffer: a torch.cat of q|k|v first took ~10 ms a layer at 2k tokens.
        buf = plan.pad_buffer((Hq + 2 * Hkv) * D, q.dtype)
        buf[:, :Hq * D].index_copy_(0, plan.pad_index, q.reshape(T, Hq * D))
        buf[:, Hq * D:(Hq + Hkv) * D].index_copy_(0, plan.pad_index, k.reshape(T, Hkv * D))
        buf[:, (Hq + Hkv) * D:].index_copy_(0, plan.pad_index, v.reshape(T, Hkv * D))
        rows = buf.view(S, L, -1)
        q = rows[..., :Hq * D].view(S, L, Hq, D)
        k = rows[..., Hq * D:(Hq + Hkv) * D].view(S, L, Hkv, D)
        v = rows[..., (Hq + Hkv) * D:].view(S, L, Hkv, D)
    else:
        q, k, v = q.reshape(S, L, Hq, D), k.reshape(S, L, Hkv, D), v.reshape(S, L, Hkv, D)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True, enable_gqa=Hq != Hkv)  # [S, Hq, L, D]
    o = o.transpose(1, 2).reshape(S * L, Hq, D)
    return o[plan.pad_index] if plan.padded else o


def prefill_with_context(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         plan: PagedAttention) -> torch.Tensor:
    """New tokens of sequences that continue a cached prefix: each query attends to the cached
    prefix and to its own sequence's new tokens up to itself.

    Their K/V are already written to the cache (``PagedAttention`` writes before it attends),
    so each sequence's whole context is read back through its block table: one SDPA over the
    queries padded to [S, Lq] and the contexts gathered to [S, W * block_size]. q [T, Hq, D] are
    the new tokens, sequence after sequence; returns [T, Hq, D].
    """
    T, Hq, D = q.shape
    tables = plan.metadata.ctx_block_tables  # [S, W]
    S, W = tables.shape
    Hkv, block_size = k_cache.shape[1], k_cache.shape[2]
    Lq = plan.ctx_len
    qp = torch.zeros(S * Lq, Hq * D, dtype=q.dtype, device=q.device)
    qp.index_copy_(0, plan.ctx_pad_index, q.reshape(T, Hq * D))
    # [S, W, Hkv, block_size, D] -> [S, Hkv, W * block_size, D]: each context, block after block
    k = k_cache[tables].transpose(1, 2).reshape(S, Hkv, W * block_size, D)
    v = v_cache[tables].transpose(1, 2).reshape(S, Hkv, W * block_size, D)
    o = F.scaled_dot_product_attention(qp.view(S, Lq, Hq, D).transpose(1, 2), k, v, attn_mask=plan.ctx_mask,
                                       enable_gqa=Hq != Hkv)  # [S, Hq, Lq, D]
    return o.transpose(1, 2).reshape(S * Lq, Hq, D)[plan.ctx_pad_index]


def decode_in_place(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    plan: PagedAttention) -> torch.Tensor:
    """One query per sequence (q [B, Hq, D]) against its paged context, reading the cache in place.

    Gathering each sequence's blocks into a dense [B, context] copy (what SDPA needs) would move
    every cached byte twice more per layer. Instead every block in use is multiplied with the
    query of the row that owns it (``plan.owner``), then a softmax runs over each row's blocks.
    """
    B, Hq, D = q.shape
    Hkv, hi = k_cache.shape[1], plan.owner.shape[0]
    G = Hq // Hkv
    kc, vc = k_cache[:hi], v_cache[:hi]  # [hi, Hkv, block_size, D]
    scores, probs = plan.scratch(q, k_cache)
    q4 = q.reshape(B, Hkv, G, D)
    qb = q4[plan.owner]  # [hi, Hkv, G, D]: each block's query
    s = torch.matmul(qb, kc.transpose(-1, -2))  # [hi, Hkv, G, block_size]
    s = s[plan.tables].permute(0, 2, 3, 1, 4)  # [B, Hkv, G, W, block_size]
    if plan.shared is not None:
        # Blocks several rows hold met one row's query above: score them against every row's.
        ks, vs = k_cache[plan.shared], v_cache[plan.shared]  # [N, Hkv, block_size, D]
        s_sh = torch.einsum("bhgd,nhtd->bnhgt", q4, ks)  # [B, N, Hkv, G, block_size]
        s = torch.where(plan.shared_mask, s_sh[plan.rows, plan.shared_pos].permute(0, 2, 3, 1, 4), s)
    torch.add(plan.bias, s, alpha=D ** -0.5, out=scores)
    W, block_size = scores.shape[-2:]
    p = torch.softmax(scores.view(B, Hkv, G, W * block_size), dim=-1).to(kc.dtype)
    p = p.view(B, Hkv, G, W, block_size)
    p_own = p if plan.shared is None else p.masked_fill(plan.shared_mask, 0)
    # Padding entries all point at the null block 0 and carry probability 0; so do shared
    # blocks here (every row writes 0 there), their share is added below.
    probs[plan.tables] = p_own.permute(0, 3, 1, 2, 4)
    ob = torch.matmul(probs, vc)  # [hi, Hkv, G, D]: each block's share of its row's output
    out = ob[plan.tables].sum(1)  # [B, Hkv, G, D]
    if plan.shared is not None:
        p_sh = torch.zeros(B, vs.shape[0], Hkv, G, block_size, dtype=p.dtype, device=p.device)
        # Each row holds a shared block at most once; its other entries add zeros.
        p_sh.index_put_((plan.rows, plan.shared_pos), (p - p_own).permute(0, 3, 1, 2, 4), accumulate=True)
        out = out + torch.einsum("bnhgt,nhtd->bhgd", p_sh, vs)
    return out.view(B, Hq, D)


def decode_gathered(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
    """:func:`decode_in_place` by gathering each row's blocks into a dense [B, Hkv, W * block_size, D] copy.

    More bytes moved than in place, but no shape depends on the blocks' ids: this is the decode
    attention that CUDA graphs replay (``batchgen.engine.graphs``). ``mask`` [B, 1, 1, W * block_size] is
    True inside each row's context.
    """
    B, Hq, D = q.shape
    Hkv, block_size = k_cache.shape[1], k_cache.shape[2]
    W = tables.shape[1]
    # [B, W, Hkv, block_size, D] -> [B, Hkv, W * block_size, D]: each row's context, block after block
    k = k_cache[tables].transpose(1, 2).reshape(B, Hkv, W * block_size, D)
    v = v_cache[tables].transpose(1, 2).reshape(B, Hkv, W * block_size, D)
    o = F.scaled_dot_product_attention(q.view(B, Hq, 1, D), k, v, attn_mask=mask,
                                       enable_gqa=Hq != Hkv)  # [B, Hq, 1, D]
    return o.view(B, Hq, D)


def batch_buckets(max_rows: int) -> tuple[int, ...]:
    """Batch sizes that replayed decode steps are padded to (CUDA graphs, the flex backend): the powers of two below ``max_rows``, then ``max_rows``.

    Padding a step up to its bucket costs little: until a few hundred rows a decode step's
    matmuls are bound by reading the weights, whatever the number of rows.
    """
    buckets = [1]
    while buckets[-1] * 2 < max_rows:
        buckets.append(buckets[-1] * 2)
    return tuple(buckets + [max_rows] if max_rows > 1 else buckets)


__all__ = ["AttentionMetadata", "batch_buckets", "update_cache", "PagedAttention", "decode_gathered", "decode_in_place", "move_blocks",
           "prefill_padded", "prefill_with_context", "write_kv"]
