"""The paged KV cache: fixed-size blocks handed to requests as they grow.

The cache is sized from a memory budget, not from ``max_batch × max_seq_len``: short requests
hold few blocks, so many more of them fit than a worst-case slot layout would allow.

Block 0 is the null block: never handed out, always zero, the padding of block tables. Free
blocks are handed out lowest id first, so the blocks in use stay packed at the low end of the
pool; decode attention reads the pool up to the highest block in use (see
``batchgen.engine.attention.decode_in_place``).

The pools live here, with the engine, not on the model: :class:`KVCache` holds one K and one V
pool per layer, and the attention backend reads and writes them.
"""

from __future__ import annotations

import heapq
import math
import mmap
from dataclasses import dataclass
from typing import Optional

import torch

from batchgen.engine.request import Request
from batchgen.model import Transformer


def bytes_per_block(model: Transformer, block_size: int, dtype: torch.dtype) -> int:
    """K and V bytes of one block across all layers of this rank's slice."""
    attn = model.layers[0].attention
    per_token = 2 * len(model.layers) * attn.n_local_kv_heads * attn.head_dim
    return per_token * block_size * torch.finfo(dtype).bits // 8


def kv_blocks_for_budget(model: Transformer, kv_cache_bytes: int, block_size: int, max_num_seqs: int,
                  max_model_len: int, dtype: torch.dtype) -> int:
    """How many KV blocks an engine gets from a budget of ``kv_cache_bytes``: as many as fit, but
    never more than ``max_num_seqs`` full-length sequences could use.

    Raises:
        ValueError: the budget holds no block at all.
    """
    per_block = bytes_per_block(model, block_size, dtype)
    blocks = min(kv_cache_bytes // per_block, max_num_seqs * -(-max_model_len // block_size))
    if blocks < 1:
        raise ValueError(f"KV cache budget of {kv_cache_bytes} bytes holds no block of {per_block} bytes")
    return blocks


@dataclass
class KVCache:
    """The paged K and V pools of every layer, ``[1 + num_blocks, Hkv, block_size, head_dim]`` each.

    Block-major, then head: decode attention multiplies whole blocks in place. Block 0 is the
    null block (always zero, the padding of block tables).
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @property
    def block_size(self) -> int:
        return self.k[0].shape[2]

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype

    @property
    def nbytes(self) -> int:
        """Bytes of all pools (K and V, every layer, the null block included)."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def zero_null_block(self) -> None:
        """Zero block 0 again in every pool (padding rows of a replayed step write into it)."""
        for k, v in zip(self.k, self.v):
            k[0].zero_()
            v[0].zero_()


def zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor; on the CPU, one whose pages the kernel supplies (zeroed) when first touched.

    ``torch.zeros`` writes every page up front: for a CPU KV cache that is most of building the
    engine (0.3 s for the bench model's 1.3 GB, seconds for a 7B model's budget) and memory the job may
    never use, since blocks are handed out lowest id first. An anonymous mapping reads as zeros
    until written, costs nothing to create, and counts in RSS only where it was touched.
    """
    if device.type != "cpu" or not hasattr(mmap, "MAP_ANONYMOUS"):  # (Windows has no such flag)
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * dtype.itemsize
    # Private: Python's default for an anonymous map is shared (shmem), which a forked child would share.
    pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(pages, dtype=dtype).view(shape)  # the tensor keeps the map alive


def host_memory_available() -> Optional[int]:
    """Bytes the kernel can hand out without swapping (``MemAvailable``); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def allocate_kv_cache(model: Transformer, num_blocks: int, block_size: int,
                      dtype: torch.dtype, device: torch.device) -> KVCache:
    """K and V block pools [1 + num_blocks, Hkv, block_size, D] for every layer of ``model``.

    Raises:
        ValueError: on the CPU, when the pools would not fit in the memory available. Their pages
            are only written as blocks are used, so an oversized pool would otherwise run until
            the kernel's OOM killer ends the process mid-job.
    """
    if device.type == "cpu":
        total = (1 + num_blocks) * bytes_per_block(model, block_size, dtype)
        available = host_memory_available()
        if available is not None and total > available:
            raise ValueError(f"a KV cache of {num_blocks} blocks needs {total / 2**30:.2f} GiB, but only "
                             f"{available / 2**30:.2f} GiB of memory is available: lower the KV budget "
                             "(kv_cache_bytes; model.kv_cache_memory_gb in a job spec), max_num_seqs or max_model_len")
    attn = model.layers[0].attention
    shape = (1 + num_blocks, attn.n_local_kv_heads, block_size, attn.head_dim)  # + the null block
    return KVCache([zeroed(shape, dtype, device) for _ in model.layers],
                   [zeroed(shape, dtype, device) for _ in model.layers])


class BlockManager:
    """Tracks free blocks (ids 1..num_blocks; 0 is the null block) and each request's block table.

    A block may be held by several tables (classification forks a prompt's blocks into one child
    per choice, see :meth:`share`): ``refs`` counts the tables holding each block in use, and a
    block returns to the free heap when its count reaches 0.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.free: list[int] = list(range(1, num_blocks + 1))  # a heap: lowest id first
        self.refs: dict[int, int] = {}  # block in use -> how many tables (or pending copies) hold it
        # Block copies (src, dst) that :meth:`share` asked for and the next step must make
        # (``AttentionMetadata.block_moves``); their sources stay held until :meth:`copies_done`.
        self.pending_copies: list[tuple[int, int]] = []

    def _take(self) -> int:
        b = heapq.heappop(self.free)
        self.refs[b] = 1
        return b

    def _drop(self, b: int) -> None:
        n = self.refs[b] - 1
        if n:
            self.refs[b] = n
        else:
            del self.refs[b]
            heapq.heappush(self.free, b)

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
        req.block_table = [self._take() for _ in range(n)]

    def can_append(self, req: Request) -> bool:
        """Room for the newest token: a new block is needed only when the last one is full."""
        return len(req.block_table) >= self.blocks_needed(len(req)) or self.num_free > 0

    def may_append(self, req: Request) -> None:
        """Make sure the block for the token at position ``len(req) - 1`` exists."""
        if len(req.block_table) < self.blocks_needed(len(req)):
            req.block_table.append(self._take())

    def release(self, req: Request) -> None:
        for b in req.block_table:
            self._drop(b)
        req.block_table = []
        req.num_cached = 0

    def share(self, source: Request, num_tokens: int) -> Optional[list[int]]:
        """A block table for a new sequence that continues ``source``'s first ``num_tokens`` cached
        tokens: ``source``'s full blocks are shared (read-only: the new sequence writes only past
        them), its partial last block is copied into a new block (queued in ``pending_copies``,
        made by the next step before it writes anything). None when no block is free for the copy.
        """
        full, rem = divmod(num_tokens, self.block_size)
        if rem and not self.free:
            return None
        table = list(source.block_table[:full])
        for b in table:
            self.refs[b] += 1
        if rem:
            src, dst = source.block_table[full], self._take()
            self.refs[src] += 1  # held until copied, even if ``source`` is released first
            self.pending_copies.append((src, dst))
            table.append(dst)
        return table

    def take_copies(self) -> list[tuple[int, int]]:
        """The queued copies for this step; call :meth:`copies_done` with them once it ran."""
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def copies_done(self, copies: list[tuple[int, int]]) -> None:
        """The step made these copies: their sources are no longer held for them."""
        for src, _ in copies:
            self._drop(src)

    def compact(self, reqs: list[Request]) -> list[tuple[int, int]]:
        """Renumber blocks so that the ``n`` blocks in use are ids 1..n again.

        Finished requests leave holes below the highest block in use, and decode attention reads
        every block up to that one. Once the holes make up more than a quarter of that range,
        each block above ``n`` takes a free id at or below ``n`` (in every table that holds it).
        ``reqs`` must be every request holding blocks. Returns the ``(src, dst)`` copies the cache
        must make (the attention backend makes them, see ``AttentionMetadata.block_moves``).
        Nothing moves while block copies are pending (their blocks are in no table yet).
        """
        if self.pending_copies:
            return []
        n = self.num_blocks - len(self.free)
        top = max((b for r in reqs for b in r.block_table), default=0)
        if top - n <= max(n // 4, 4):
            return []
        holes = iter(sorted(b for b in self.free if b <= n))  # as many as blocks in use above n
        remap: dict[int, int] = {}
        for r in reqs:
            for i, b in enumerate(r.block_table):
                if b > n:
                    if b not in remap:
                        remap[b] = next(holes)
                    r.block_table[i] = remap[b]
        moves = list(remap.items())
        for src, dst in moves:
            self.refs[dst] = self.refs.pop(src)
        taken = set(remap.values())
        self.free = [b for b in self.free if b not in taken] + list(remap)
        heapq.heapify(self.free)
        return moves
