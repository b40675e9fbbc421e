"""The paged KV cache: fixed-size blocks handed to requests as they grow.

The cache is sized from a memory budget, not from ``max_batch × max_seq_len``: short requests
hold few blocks, so many more of them fit than a worst-case slot layout would allow.
"""

from __future__ import annotations

from collections import deque

import torch

from batchgen.engine.request import Request
from batchgen.model import Transformer


def bytes_per_block(model: Transformer, block_size: int, dtype: torch.dtype) -> int:
    """K and V bytes of one block across all layers of this rank's slice."""
    attn = model.layers[0].attention
    per_token = 2 * len(model.layers) * attn.n_local_kv_heads * attn.head_dim
    return per_token * block_size * torch.finfo(dtype).bits // 8


def allocate_kv_cache(model: Transformer, num_blocks: int, block_size: int,
                      dtype: torch.dtype, device: torch.device) -> None:
    """Give every attention layer its K and V block pools [num_blocks, block_size, Hkv, D]."""
    for layer in model.layers:
        attn = layer.attention
        shape = (num_blocks, block_size, attn.n_local_kv_heads, attn.head_dim)
        attn.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        attn.v_cache = torch.zeros(shape, dtype=dtype, device=device)


class BlockManager:
    """Tracks free blocks and each request's block table."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, req: Request) -> bool:
        """Room for the request's whole current sequence (its prompt, or prompt + output after preemption)."""
        return self.blocks_needed(len(req)) <= self.num_free

    def allocate(self, req: Request) -> None:
        assert not req.block_table
        n = self.blocks_needed(len(req))
        req.block_table = [self.free.popleft() for _ in range(n)]

    def can_append(self, req: Request) -> bool:
        """Room for the newest token: a new block is needed only when the last one is full."""
        return len(req.block_table) >= self.blocks_needed(len(req)) or self.num_free > 0

    def may_append(self, req: Request) -> None:
        """Make sure the block for the token at position ``len(req) - 1`` exists."""
        if len(req.block_table) < self.blocks_needed(len(req)):
            req.block_table.append(self.free.popleft())

    def release(self, req: Request) -> None:
        self.free.extend(req.block_table)
        req.block_table = []
        req.num_cached = 0
