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

import hashlib
import heapq
import math
import mmap
from array import array
from collections import OrderedDict
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
    """Tracks free blocks (ids 1..num_blocks; 0 is the null block), reference counts and each
    request's block table; with ``prefix_caching``, also the index of cached full blocks.

    Every block in a table holds one reference per table. A full block whose K/V are in the cache
    is registered under a content hash (its parent block's hash, its token ids and the request's
    adapter id, see :func:`block_hash`), so that a later request with the same prefix shares it
    (:meth:`allocate` takes the longest run of cached full blocks). A registered block whose last
    reference goes stays cached but evictable; :meth:`_take` hands out never-registered free
    blocks lowest id first, then evicts the least recently released cached one.

    Others that hold blocks (:meth:`fork`: a classification child sharing its parent's prompt on the
    flex backend) take references with
    :meth:`share` and give them back with :meth:`release_blocks`.
    """

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.prefix_caching = prefix_caching
        self.free: list[int] = list(range(1, num_blocks + 1))  # a heap: lowest id first
        self.refs = [0] * (num_blocks + 1)
        self.cached: dict[bytes, int] = {}  # hash -> block holding that content
        self.hash_of: dict[int, bytes] = {}  # registered block -> its hash
        # Registered blocks nobody references, least recently released first.
        self.evictable: OrderedDict[int, None] = OrderedDict()
        # Block copies (src, dst) that :meth:`fork` asked for and the next step must make
        # (``AttentionMetadata.block_moves``); each source holds one reference until
        # :meth:`copies_done`.
        self.pending_copies: list[tuple[int, int]] = []

    def _take(self) -> int:
        if self.free:
            b = heapq.heappop(self.free)
        else:  # the least recently used cached block gives up its content
            b, _ = self.evictable.popitem(last=False)
            del self.cached[self.hash_of.pop(b)]
        self.refs[b] = 1
        return b

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out: free ones and cached ones nobody references."""
        return len(self.free) + len(self.evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks in the prefix index (referenced or not)."""
        return len(self.cached)

    def clear_prefix_cache(self) -> None:
        """Forget every cached block nobody references (they become free); referenced blocks
        stay indexed. A benchmark calls this between runs, so that each starts cold."""
        for b in self.evictable:
            del self.cached[self.hash_of.pop(b)]
            heapq.heappush(self.free, b)
        self.evictable.clear()

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _hashes(self, req: Request, n: int) -> list[bytes]:
        """The hashes of ``req``'s first ``n`` full blocks (kept on the request: tokens never change)."""
        hashes = req.block_hashes
        bs = self.block_size
        while len(hashes) < n:
            i = len(hashes)
            hashes.append(block_hash(hashes[-1] if hashes else b"", req.token_ids[i * bs:(i + 1) * bs],
                                     req.adapter_id))
        return hashes

    def lookup(self, req: Request) -> list[int]:
        """The longest run of cached blocks that starts ``req``'s sequence. The last
        ``req.num_logit_rows`` tokens (at least the last one) are never covered: their logits
        are needed, so they are computed."""
        if not self.prefix_caching:
            return []
        hits = []
        for h in self._hashes(req, max(len(req) - req.num_logit_rows, 0) // self.block_size):
            b = self.cached.get(h)
            if b is None:
                break
            hits.append(b)
        return hits

    def can_allocate(self, req: Request) -> bool:
        """Room for the request's whole current sequence (its prompt, or prompt + output after
        preemption), counting the cached blocks it would share."""
        hits = self.lookup(req)
        reclaimed = sum(1 for b in hits if b in self.evictable)  # would stop being evictable
        return self.blocks_needed(len(req)) - len(hits) <= self.num_free - reclaimed

    def allocate(self, req: Request) -> None:
        """Give ``req`` blocks for its sequence, sharing its cached prefix; sets ``req.num_cached``."""
        assert not req.block_table
        hits = self.lookup(req)
        self.share(hits)
        n = self.blocks_needed(len(req))
        req.block_table = hits + [self._take() for _ in range(n - len(hits))]
        req.num_cached = len(hits) * self.block_size

    def share(self, blocks: list[int]) -> None:
        """Take one more reference to each of ``blocks`` (blocks in use, or cached ones)."""
        for b in blocks:
            if self.refs[b] == 0:
                self.evictable.pop(b)
            self.refs[b] += 1

    def commit(self, req: Request) -> None:
        """Register ``req``'s full blocks whose K/V are now in the cache (``req.num_cached``), within
        its ``sequence_len`` (a classification row's branches are no sequence another could share)."""
        if not self.prefix_caching:
            return
        n = min(min(req.num_cached, req.sequence_len) // self.block_size, len(req.block_table))
        for i, h in enumerate(self._hashes(req, n)):
            b = req.block_table[i]
            if b in self.hash_of:
                continue
            # Another block may already hold this content (same prefix prefilled in one step):
            # keep the first, this one stays unregistered and is freed as usual.
            self.cached.setdefault(h, b)
            if self.cached[h] == b:
                self.hash_of[b] = h

    def can_append(self, req: Request) -> bool:
        """Room for the newest token: a new block is needed only when the last one is full."""
        return len(req.block_table) >= self.blocks_needed(len(req)) or self.num_free > 0

    def may_append(self, req: Request) -> None:
        """Make sure the block for the token at position ``len(req) - 1`` exists."""
        if len(req.block_table) < self.blocks_needed(len(req)):
            req.block_table.append(self._take())

    def release_blocks(self, blocks: list[int]) -> None:
        """Drop one reference to each of ``blocks``; an unreferenced block becomes free, or
        evictable (most recently used) when it is in the prefix index."""
        for b in blocks:
            self.refs[b] -= 1
            assert self.refs[b] >= 0, f"block {b} released more often than taken"
            if self.refs[b] == 0:
                if b in self.hash_of:
                    self.evictable[b] = None
                else:
                    heapq.heappush(self.free, b)

    def release(self, req: Request) -> None:
        """Give back ``req``'s blocks (finished or preempted)."""
        # Last block first: a request's tail is the least likely to be shared again, so LRU
        # evicts it before the prefix it hangs off.
        self.release_blocks(req.block_table[::-1])
        req.block_table = []
        req.num_cached = 0

    def fork(self, source: Request, num_tokens: int, total_tokens: Optional[int] = None) -> Optional[list[int]]:
        """A block table for a new sequence that continues ``source``'s first ``num_tokens`` cached
        tokens (a classification child) up to ``total_tokens`` (default ``num_tokens``):
        ``source``'s full blocks are shared (:meth:`share`; read-only: the new sequence writes
        only past them), its partial last block is copied into a new block (queued in
        ``pending_copies``, made by the next step before it writes anything), and new blocks
        hold the rest. None when there are not enough free blocks. The table is given back like
        any other, with :meth:`release` or :meth:`release_blocks`.
        """
        full, rem = divmod(num_tokens, self.block_size)
        extra = self.blocks_needed(max(total_tokens or 0, num_tokens)) - full  # copy + new blocks
        if extra > self.num_free:
            return None
        table = list(source.block_table[:full])
        self.share(table)
        if rem:
            src = source.block_table[full]
            self.share([src])  # held until copied, even if ``source`` is released first
            dst = self._take()
            self.pending_copies.append((src, dst))
            table.append(dst)
        table.extend(self._take() for _ in range(extra - bool(rem)))
        return table

    def take_copies(self) -> list[tuple[int, int]]:
        """The queued copies for this step; call :meth:`copies_done` with them once it ran."""
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def copies_done(self, copies: list[tuple[int, int]]) -> None:
        """The step made these copies (or dropped them): their sources are no longer held for them."""
        self.release_blocks([src for src, _ in copies])

    def compact(self, reqs: list[Request]) -> list[tuple[int, int]]:
        """Renumber blocks so that the ``n`` referenced blocks are ids 1..n again.

        Finished requests leave holes below the highest block in use, and decode attention reads
        every block up to that one. Once the holes make up more than a quarter of that range,
        each referenced block above ``n`` takes an unreferenced id at or below ``n`` (a free
        one, else the least recently used cached one, which is evicted). ``reqs`` must be every
        request holding blocks: each of their tables is updated, also where several share a
        moved block, and so is the prefix index. Returns the ``(src, dst)`` copies the cache must
        make (the attention backend makes them, see ``AttentionMetadata.block_moves``).
        Nothing moves while block copies are pending: their sources may be in no table any more
        and their destinations are in none yet, so a renumbering would miss them.
        """
        if self.pending_copies:
            return []
        used = {b for r in reqs for b in r.block_table}
        n = len(used)
        top = max(used, default=0)
        if top - n <= max(n // 4, 4):
            return []
        free_holes = sorted(b for b in self.free if b <= n)
        cached_holes = [b for b in self.evictable if b <= n]  # LRU first
        holes = iter(free_holes + cached_holes)  # as many as referenced blocks above n
        mapping: dict[int, int] = {}
        for src in sorted(b for b in used if b > n):
            dst = next(holes)
            if dst in self.evictable:  # its cached content is overwritten
                del self.evictable[dst]
                del self.cached[self.hash_of.pop(dst)]
            mapping[src] = dst
            self.refs[dst], self.refs[src] = self.refs[src], 0
            h = self.hash_of.pop(src, None)
            if h is not None:
                self.hash_of[dst] = h
                self.cached[h] = dst
        for r in reqs:
            r.block_table = [mapping.get(b, b) for b in r.block_table]
        taken = set(mapping.values())
        self.free = [b for b in self.free if b not in taken] + list(mapping)
        heapq.heapify(self.free)
        return list(mapping.items())


def block_hash(parent: bytes, token_ids: list[int], adapter_id: Optional[str]) -> bytes:
    """The content address of one full KV block: its K/V depend on every earlier token (the
    parent's hash chains them), its own tokens and the adapter that computed them."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(array("q", token_ids).tobytes())
    if adapter_id is not None:
        h.update(b"\0adapter\0" + adapter_id.encode())
    return h.digest()
